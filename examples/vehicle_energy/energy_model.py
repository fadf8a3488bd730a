"""A vehicle's energy-consumption regressor, written only against fedmqtt's public API.

Each car learns how much energy it uses (kWh per 100 km) from what its own
sensors see: speed, outside temperature, road gradient and payload. The
physics is not linear in speed (air drag grows with its square, and
heating or cooling costs grow as the temperature leaves ~20 °C), so the
model expands its inputs itself before a linear layer. It is trained with
the Huber loss, because one bad sensor reading on a CAN bus should not
drag the fleet's model around.

fedmqtt only sees the two named float32 arrays ``w`` and ``b``; the
feature expansion, the loss and the ONNX graph are this file's business.
The device needs numpy only; ``to_onnx`` imports onnx and runs on the
aggregator only.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

import fedmqtt

# Raw inputs, in column order.
FEATURES = ("speed_kmh", "temp_c", "gradient_pct", "payload_kg")
# Scales that bring each raw input to about [-1, 1], so one learning rate fits all.
SCALE = np.array([100.0, 20.0, 5.0, 500.0], dtype=np.float32)
# Expanded features: speed, speed^2, |temp - 20|, gradient, payload, each centred
# on a typical fleet's value: SGD converges many times faster on centred
# inputs (the bias no longer competes with every weight).
N_EXPANDED = 5
CENTRE = np.array([0.7, 0.6, 0.55, 0.0, 0.45], dtype=np.float32)
# Huber loss threshold in kWh/100 km: beyond it an error counts linearly (a faulty reading).
HUBER_DELTA = 2.0


def expand(X: np.ndarray) -> np.ndarray:
    """The features the linear layer sees (float32 [n, 5])."""
    Z = np.asarray(X, dtype=np.float32) / SCALE
    speed, temp, grad, load = Z[:, 0], Z[:, 1], Z[:, 2], Z[:, 3]
    return np.stack([speed, speed * speed, np.abs(temp - np.float32(1.0)), grad, load], axis=1) - CENTRE


class EnergyRegressor(fedmqtt.NumpyModel):
    """kWh/100 km from [speed_kmh, temp_c, gradient_pct, payload_kg]: a linear model on expanded features."""

    kind = "energy_model:EnergyRegressor"
    n_features = len(FEATURES)
    n_outputs = 1
    task = "regression"

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"w": (N_EXPANDED,), "b": (1,)}

    def init_params(self, seed: int = 0) -> dict[str, np.ndarray]:
        # A convex problem: start from zero, like the built-in linear model.
        return {"w": np.zeros(N_EXPANDED, np.float32), "b": np.zeros(1, np.float32)}

    def _forward(self, params: Mapping[str, np.ndarray], X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        Z = expand(X)
        return Z, Z @ params["w"] + params["b"][0]

    def loss_and_grads(self, params, X, y):
        Z, pred = self._forward(params, X)
        err = pred - np.asarray(y, dtype=np.float32)
        small = np.abs(err) <= HUBER_DELTA
        loss = np.where(small, 0.5 * err * err, HUBER_DELTA * (np.abs(err) - 0.5 * HUBER_DELTA))
        g = np.where(small, err, HUBER_DELTA * np.sign(err)).astype(np.float32) / np.float32(len(X))
        return float(loss.mean()), {"w": Z.T @ g, "b": np.array([g.sum()], np.float32)}

    def predict(self, params, X):
        return self._forward(params, X)[1].astype(np.float32)

    def evaluate(self, params, X, y):
        if len(X) == 0:
            return {}
        err = self.predict(params, X) - np.asarray(y, dtype=np.float32)
        # Report the plain mean absolute error a fleet engineer reads, beside the training loss.
        return {"loss": self.loss_and_grads(params, X, y)[0], "mae": float(np.abs(err).mean())}

    def to_onnx(self, params):
        """The same computation as an ONNX graph: input [batch, 4] -> prediction [batch]."""
        from onnx import TensorProto, helper, numpy_helper

        def const(name, value):
            return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)

        def node(op, inputs, output, **attrs):
            return helper.make_node(op, inputs, [output], **attrs)

        nodes = [
            node("Div", ["input", "scale"], "z"),
            helper.make_node("Split", ["z"], ["speed", "temp", "grad", "load"], axis=1, num_outputs=4),
            node("Mul", ["speed", "speed"], "speed2"),
            node("Sub", ["temp", "one"], "temp_off"),
            node("Abs", ["temp_off"], "temp_abs"),
            node("Concat", ["speed", "speed2", "temp_abs", "grad", "load"], "raw_features", axis=1),
            node("Sub", ["raw_features", "centre"], "features"),
            node("MatMul", ["features", "w"], "linear"),
            node("Add", ["linear", "b"], "prediction"),
        ]
        graph = helper.make_graph(
            nodes, "vehicle_energy",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", len(FEATURES)])],
            [helper.make_tensor_value_info("prediction", TensorProto.FLOAT, ["batch"])],
            initializer=[const("scale", SCALE), const("one", [1.0]), const("centre", CENTRE), const("w", params["w"]),
                         const("b", params["b"])],
        )
        # IR 9 / opset 18 (Split's num_outputs attribute): onnxruntime >= 1.14 runs it.
        model = helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 18)])
        return model.SerializeToString()
