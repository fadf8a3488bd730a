"""ONNX export of a global model, built with the ``onnx`` package (helper, numpy_helper).

Graph contract (docs/PROTOCOL.md §ONNX): one input ``input`` float32
``[batch, n_features]`` with a dynamic batch dimension. Classifiers (softmax,
mlp) output ``probabilities`` float32 ``[batch, classes]`` and ``label``
int64 ``[batch]`` (argmax of the logits, exactly as the numpy model);
linear regression outputs ``prediction`` float32 ``[batch]``.
"""

from __future__ import annotations

import datetime as _dt
import json
from typing import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_agent import __version__
from edge_agent.model_api import FedModel
from edge_agent.spec import ModelSpec

# IR 8 / opset 17: the onnx package stamps its newest IR version by default,
# which older onnxruntime builds refuse ("Unsupported model IR version").
# IR 8 with opset 17 loads on every onnxruntime since 1.12 (2022), so a
# gateway or phone with a years-old runtime can still serve our models, and
# opset 17 has everything used here (Softmax on axis -1, ArgMax, Squeeze
# with axes as an input).
IR_VERSION = 8
OPSET = 17

INPUT = "input"
PROBABILITIES = "probabilities"
LABEL = "label"
PREDICTION = "prediction"
BATCH = "batch"


def to_onnx(
    spec: ModelSpec,
    params: Mapping[str, np.ndarray],
    *,
    federation: str,
    round: int,
    version: str,
    class_labels: list[str] | None = None,
    created: _dt.datetime | None = None,
    check: bool = True,
) -> onnx.ModelProto:
    """The ONNX model of ``params``, with fedmqtt metadata, checked by ``onnx.checker`` (unless ``check`` is off)."""
    nodes: list[onnx.NodeProto] = []
    inits = [numpy_helper.from_array(np.asarray(params[name], dtype=np.float32), name) for name in spec.param_shapes()]
    n_layers = len(spec.layer_sizes()) - 1
    h = INPUT
    for i in range(n_layers):
        mm, z = f"matmul{i}", f"z{i}"
        nodes.append(helper.make_node("MatMul", [h, f"W{i}"], [mm], name=f"MatMul{i}"))
        nodes.append(helper.make_node("Add", [mm, f"b{i}"], [z], name=f"Add{i}"))
        h = z
        if i < n_layers - 1:
            nodes.append(helper.make_node("Relu", [z], [f"relu{i}"], name=f"Relu{i}"))
            h = f"relu{i}"
    if spec.kind == "linear":
        inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "squeeze_axes"))
        nodes.append(helper.make_node("Squeeze", [h, "squeeze_axes"], [PREDICTION], name="Squeeze"))
        outputs = [helper.make_tensor_value_info(PREDICTION, TensorProto.FLOAT, [BATCH])]
        what = f"linear regression on {spec.n_features} features"
    else:
        nodes.append(helper.make_node("Softmax", [h], [PROBABILITIES], axis=-1, name="Softmax"))
        nodes.append(helper.make_node("ArgMax", [h], [LABEL], axis=1, keepdims=0, name="ArgMax"))
        outputs = [
            helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, [BATCH, spec.n_outputs]),
            helper.make_tensor_value_info(LABEL, TensorProto.INT64, [BATCH]),
        ]
        arch = "softmax regression" if spec.kind == "softmax" else f"MLP {spec.layer_sizes()} with ReLU"
        what = f"{arch}, {spec.n_features} features, {spec.n_outputs} classes"
    graph = helper.make_graph(
        nodes,
        f"fedmqtt_{spec.kind}",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [BATCH, spec.n_features])],
        outputs,
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        producer_name="fedmqtt",
        producer_version=__version__,
        ir_version=IR_VERSION,
        opset_imports=[helper.make_opsetid("", OPSET)],
        doc_string=(
            f"fedmqtt global model of federation {federation!r} after round {round} "
            f"(version {version}): {what}. Input '{INPUT}' float32 [batch, {spec.n_features}]."
        ),
    )
    labels = class_labels if class_labels is not None else [str(c) for c in range(spec.n_outputs)]
    created = created or _dt.datetime.now(_dt.timezone.utc)
    meta = {
        "fedmqtt_version": __version__,
        "federation": federation,
        "round": str(round),
        "model_version": version,
        "model_kind": spec.kind,
        "n_features": str(spec.n_features),
        "n_outputs": str(spec.n_outputs),
        "hidden": json.dumps(list(spec.hidden)),
        "class_labels": json.dumps(labels if spec.kind != "linear" else []),
        "created": created.isoformat(timespec="seconds"),
    }
    helper.set_model_props(model, meta)
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def to_onnx_bytes(spec: ModelSpec, params: Mapping[str, np.ndarray], **info) -> bytes:
    """Serialized :func:`to_onnx`, checked in its serialized form.

    check_model would serialize the model itself; checking the bytes we
    publish anyway serializes once (bench/bench_onnx.py: 6.1 -> 2.7 ms for a
    1M-parameter MLP when the heap is cold).
    """
    data = to_onnx(spec, params, check=False, **info).SerializeToString()
    onnx.checker.check_model(data, full_check=True)
    return data


class OnnxUnavailable(ValueError):
    """A model that has no ONNX graph, or gave one that breaks the graph contract."""


def model_to_onnx_bytes(model: FedModel, params: Mapping[str, np.ndarray], *, federation: str, round: int,
                        version: str, class_labels: list[str] | None = None) -> bytes:
    """The checked ONNX bytes of any model: built-in graphs from here, a custom model's from its ``to_onnx``.

    A custom graph gets the same fedmqtt metadata as the built-in ones and
    must take the same input (``input``, float32 [batch, n_features]).
    """
    spec = model.spec
    if spec.builtin:
        return to_onnx_bytes(spec, params, federation=federation, round=round, version=version,
                             class_labels=class_labels)
    data = model.to_onnx(params)
    if data is None:
        raise OnnxUnavailable(f"model {spec.kind!r} has no ONNX graph (its to_onnx returned None)")
    graph = onnx.load_from_string(data) if isinstance(data, (bytes, bytearray)) else data
    inputs = [i.name for i in graph.graph.input if i.name not in {t.name for t in graph.graph.initializer}]
    if inputs != [INPUT]:
        raise OnnxUnavailable(f"model {spec.kind!r}: the ONNX graph must take one input {INPUT!r} "
                              f"(float32 [batch, {spec.n_features}]), it takes {inputs}")
    labels = class_labels if class_labels is not None else [str(c) for c in range(spec.n_outputs)]
    meta = metadata(graph)
    meta.update({
        "fedmqtt_version": __version__, "federation": federation, "round": str(round), "model_version": version,
        "model_kind": spec.kind, "n_features": str(spec.n_features), "n_outputs": str(spec.n_outputs),
        "hidden": "[]", "class_labels": json.dumps(labels if model.classifier else []),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })
    helper.set_model_props(graph, meta)
    out = graph.SerializeToString()
    onnx.checker.check_model(out, full_check=True)
    return out


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    """The ``metadata_props`` of a model as a dict."""
    return {p.key: p.value for p in model.metadata_props}
