"""A PyTorch ``nn.Module`` as a fedmqtt model (the ``fedmqtt[torch]`` extra).

Install with ``pip install torch==2.13.0`` (a CPU build), then ``pip install
"fedmqtt[torch]"``. This module imports torch at top level: only devices and
aggregators that federate a torch model import it; ``edge_agent`` itself
never does, so a numpy-only device needs no torch.

On the wire a torch model is nothing special: its parameters are the
floating-point entries of the module's ``state_dict()`` (weights, biases and
float buffers such as BatchNorm running statistics), sent as named float32
arrays in state_dict order (names like ``conv1.weight``), exactly as the
numpy models' arrays. Integer buffers (``num_batches_tracked``) stay on the
device and are not federated.

Why a factory rather than a module instance: :meth:`TorchModel.init_params`
must give the same arrays for the same seed. ``torch.manual_seed(seed);
factory()`` reproduces every initialisation the module's ``__init__`` does,
including custom ``nn.init`` calls and bare ``nn.Parameter``\\ s, exactly as a
PyTorch user gets it. A module instance is accepted too; its initial
parameters then come from each submodule's ``reset_parameters()`` under the
seed, and a parameter held by a module without ``reset_parameters`` (whose
initialisation we cannot redo) is refused with a message asking for a
factory.
"""

from __future__ import annotations

import copy
import importlib
import io
import logging
import math
import threading
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .model_api import CLASSIFICATION, DTYPE, REGRESSION, FedModel, ModelError, Params, TrainData
from .spec import PARAM_NAME, ModelSpec, custom_kind
from .wire import TrainConfig

log = logging.getLogger(__name__)

__all__ = ["TorchModel", "FitFn", "EvaluateFn", "DEFAULT_KIND", "ONNX_OPSET"]

# The user's own training loop: fit_fn(module, data, config) -> metrics.
FitFn = Callable[[nn.Module, TrainData, TrainConfig], Mapping[str, float] | None]
# The user's own evaluation: evaluate_fn(module, X, y) -> {"loss": .., "accuracy": ..}.
EvaluateFn = Callable[[nn.Module, np.ndarray, np.ndarray], Mapping[str, float]]
ModuleOrFactory = Union[nn.Module, Callable[[], nn.Module], str]

# The wire name of a torch model built directly from Python (the model
# loader overwrites it with the configured ``kind``). Both sides compare it,
# together with every parameter's name and shape.
DEFAULT_KIND = "torch"
# The ONNX graph contract (aggregator/onnx_export.py): opset 17 loads on every
# onnxruntime since 1.12; the TorchScript exporter stamps IR 8 with it.
ONNX_OPSET = 17
ONNX_INPUT, ONNX_PROBABILITIES, ONNX_LABEL, ONNX_PREDICTION, ONNX_BATCH = (
    "input", "probabilities", "label", "prediction", "batch")
# Rows per forward pass in evaluate/predict: bounds the activations' memory on
# a small device whatever the size of the data set.
INFERENCE_BATCH = 1024
# Rows of the zero input used to check the module's output shape and to trace
# the ONNX export (2, not 1: a batch of one lets a tracer bake in size-1 dims).
PROBE_ROWS = 2
# torch.manual_seed takes a 64-bit seed; the seeds drawn for training stay below 2**63.
TORCH_SEED_BITS = 63
# Spawn-key entry of the SeedSequence child that seeds torch in fit; the batch
# order comes from default_rng(seed) itself, as in NumpyModel.fit, so a torch
# model and a numpy model visit the batches in the same order for one seed.
TORCH_STREAM = 0x7043
# Serializes the seeded sections of every TorchModel in this process (see TorchModel._rng).
_TORCH_RNG_LOCK = threading.RLock()


def _resolve(ref: str, what: str) -> Any:
    """``"package.module:attr"`` from the device's own configuration (never from the wire)."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ModelError("bad_model", f"{what} {ref!r} must be 'package.module:name'")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError("bad_model", f"{what} {ref!r}: cannot import {module_name} ({exc})") from None
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ModelError("bad_model", f"{what} {ref!r}: {module_name} has no {attr}")
    return obj


def _torch_seed(seed: int | np.random.SeedSequence) -> int:
    """A torch seed for one fit, from a stream independent of the batch order's."""
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    child = np.random.SeedSequence(ss.entropy, spawn_key=(*ss.spawn_key, TORCH_STREAM), pool_size=ss.pool_size)
    return int(child.generate_state(1, np.uint64)[0]) >> (64 - TORCH_SEED_BITS)


class _OnnxHead(nn.Module):
    """The module plus the fedmqtt graph contract's outputs: (softmax, argmax) or a flat prediction."""

    def __init__(self, module: nn.Module, classifier: bool) -> None:
        super().__init__()
        self.module = module
        self.classifier = classifier

    def forward(self, x: torch.Tensor):  # noqa: D102 - traced, not called by users
        out = self.module(x)
        if self.classifier:
            return torch.softmax(out, dim=-1), torch.argmax(out, dim=1)
        return torch.flatten(out)


class TorchModel(FedModel):
    """A ``torch.nn.Module`` federated by fedmqtt: parameters are its floating-point ``state_dict`` entries.

    ``TorchModel(factory, n_features=64, n_outputs=10)``: ``module`` (the
    first argument) is a factory, i.e. a callable such as the module's class
    that returns a fresh module (preferred: see the module docstring), or a
    module instance, or ``"package.module:factory"`` (so a config file can
    name it: ``kind = "edge_agent.torch_model:TorchModel"`` with
    ``options = {module = "mypkg.nets:make_cnn", n_features = 64, n_outputs = 10}``).
    The module takes float ``[n, n_features]`` (reshape inside ``forward``
    for images) and returns logits ``[n, n_outputs]`` for classifiers, or
    ``[n]``/``[n, 1]`` for regression.

    ``fit_fn(module, data, config) -> metrics`` replaces the default loop
    (seeded minibatch SGD with cross-entropy or MSE and FedProx); the module
    already holds the global parameters and is in train mode, torch's RNG is
    seeded from the round's seed, ``data.source`` is whatever the device
    passed as its data (e.g. a DataLoader), and the module's state after the
    call is the update. ``evaluate_fn(module, X, y) -> {"loss": .., "accuracy": ..}``
    replaces the default evaluation; it gets numpy arrays and runs with the
    module in eval mode under ``torch.no_grad()``. Whatever either raises
    propagates (the agent reports ``training_failed`` and sends nothing).

    The object keeps one module and loads the given parameters into it for
    every call (a lock serialises calls from several threads); it never
    keeps or shares memory with the caller's arrays.
    """

    def __init__(self, module: ModuleOrFactory, *, n_features: int, n_outputs: int,
                 task: str = CLASSIFICATION, fit_fn: FitFn | str | None = None,
                 evaluate_fn: EvaluateFn | str | None = None, device: str | torch.device = "cpu",
                 kind: str | None = None) -> None:
        if task not in (CLASSIFICATION, REGRESSION):
            raise ModelError("bad_model", f"task must be {CLASSIFICATION!r} or {REGRESSION!r}, got {task!r}")
        if task == REGRESSION and n_outputs != 1:
            raise ModelError("bad_model", f"a regression model predicts one value per row (n_outputs = 1), "
                                          f"got {n_outputs}")
        if task == CLASSIFICATION and (not isinstance(n_outputs, int) or n_outputs < 2):
            raise ModelError("bad_model", f"a classifier needs n_outputs >= 2 classes, got {n_outputs!r}")
        kind = kind or self._default_kind()
        if not custom_kind(kind):
            raise ModelError("bad_model", f"kind {kind!r} must be a custom model name such as 'torch' or "
                                          "'package.module:ClassName'")
        if isinstance(module, str):
            module = _resolve(module, "module")
        if isinstance(fit_fn, str):
            fit_fn = _resolve(fit_fn, "fit_fn")
        if isinstance(evaluate_fn, str):
            evaluate_fn = _resolve(evaluate_fn, "evaluate_fn")
        for name, fn in (("fit_fn", fit_fn), ("evaluate_fn", evaluate_fn)):
            if fn is not None and not callable(fn):
                raise ModelError("bad_model", f"{name} must be callable, got {type(fn).__name__}")
        self.kind, self.n_features, self.n_outputs, self.task = kind, n_features, n_outputs, task
        self.fit_fn, self.evaluate_fn = fit_fn, evaluate_fn
        self.device = torch.device(device)
        self._lock = threading.RLock()
        if isinstance(module, nn.Module):
            self.factory: Callable[[], nn.Module] | None = None
            instance = module
        elif callable(module):
            self.factory = module
            instance = self._build()
        else:
            raise ModelError("bad_model", "TorchModel takes an nn.Module, a callable returning one, or "
                                          f"'package.module:factory', got {type(module).__name__}")
        self.module = instance.to(self.device)
        self._shapes = self._float_shapes(self.module)
        floats = [t for t in self.module.state_dict().values() if t.is_floating_point()]
        self._dtype = floats[0].dtype if floats else torch.float32
        try:
            self.spec  # noqa: B018 - checks names, shapes, counts and sizes against the wire's limits
        except ValueError as exc:
            raise ModelError("bad_model", f"torch model: {exc}") from None
        self._check_output()

    @classmethod
    def _default_kind(cls) -> str:
        """The wire name when none is given: the class's ``kind``, a subclass's ``module:ClassName``, or "torch".

        The model loader replaces it with the configured ``kind``; a
        subclass is named like the loader would name it, so a device that
        passes an instance and an aggregator that configures the class agree.
        """
        if cls.kind:
            return cls.kind
        if cls is not TorchModel:
            name = f"{cls.__module__}:{cls.__qualname__}"
            if custom_kind(name):
                return name
        return DEFAULT_KIND

    # -- parameters -----------------------------------------------------------

    def _build(self) -> nn.Module:
        assert self.factory is not None
        try:
            module = self.factory()
        except Exception as exc:  # the user's factory: report it as a configuration problem
            raise ModelError("bad_model", f"the module factory failed: {type(exc).__name__}: {exc}") from None
        if not isinstance(module, nn.Module):
            raise ModelError("bad_model", f"the module factory returned {type(module).__name__}, not an nn.Module")
        return module

    @staticmethod
    def _float_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
        """The federated entries of a module's state_dict: names and shapes, in state_dict order."""
        shapes: dict[str, tuple[int, ...]] = {}
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                continue
            if not PARAM_NAME.match(name):
                raise ModelError("bad_model", f"state_dict entry {name!r} is not a valid parameter name "
                                              f"({PARAM_NAME.pattern}); rename the submodule")
            shapes[name] = tuple(int(d) for d in t.shape)
        if not shapes:
            raise ModelError("bad_model", "the module has no floating-point parameters to federate")
        return shapes

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def init_params(self, seed: int = 0) -> Params:
        """The initial parameters for ``seed``: what ``torch.manual_seed(seed); factory()`` gives.

        A module instance is copied and every submodule's ``reset_parameters()``
        runs under the seed. torch's global RNG is left as it was.
        """
        with self._lock, self._rng(int(seed)):
            if self.factory is not None:
                fresh = self._build()
            else:
                fresh = copy.deepcopy(self.module)
                uncovered = [f"{prefix + '.' if prefix else ''}{name}"
                             for prefix, sub in fresh.named_modules()
                             if not callable(getattr(sub, "reset_parameters", None))
                             for name, _ in sub.named_parameters(recurse=False)]
                if uncovered:
                    raise ModelError("bad_model", f"cannot re-initialise {uncovered[:4]} (their modules have no "
                                                  "reset_parameters()): pass a factory that builds the module")
                for sub in fresh.modules():
                    reset = getattr(sub, "reset_parameters", None)
                    if callable(reset):
                        reset()
            if self._float_shapes(fresh) != self._shapes:
                raise ModelError("bad_model", "the factory built a module with other parameters than the first "
                                              "time; it must always build the same architecture")
            return self.params_of(fresh)

    @staticmethod
    def params_of(module: nn.Module) -> Params:
        """A module's floating-point state as float32 numpy arrays (copies: no memory shared with the module)."""
        return {name: np.array(t.detach().to("cpu", torch.float32).numpy(), dtype=DTYPE, copy=True)
                for name, t in module.state_dict().items() if t.is_floating_point()}

    def load_params(self, params: Mapping[str, np.ndarray], module: nn.Module | None = None) -> nn.Module:
        """Copy ``params`` into ``module`` (this model's own by default) with ``load_state_dict``; returns it.

        The arrays are checked against the spec and copied: the module never
        shares memory with them (decoded wire arrays are read-only, and the
        caller keeps its own). Integer buffers keep their values.
        """
        module = self.module if module is None else module
        checked = self.check_params(params, "parameters")
        state = dict(module.state_dict())
        for name, a in checked.items():
            state[name] = torch.tensor(a, dtype=state[name].dtype, device=state[name].device)
        module.load_state_dict(state, strict=True)
        return module

    # -- training -------------------------------------------------------------

    def fit(self, params: Mapping[str, np.ndarray], data: TrainData, config: TrainConfig,
            seed: int | np.random.SeedSequence) -> tuple[Params, dict[str, float]]:
        """Train from ``params``: the user's ``fit_fn`` or seeded minibatch SGD; (new params, train_ metrics)."""
        with self._lock, self._rng(_torch_seed(seed)):
            module = self.load_params(params)
            module.train()
            if self.fit_fn is not None:
                raw = self.fit_fn(module, data, config)
                metrics = self._train_metrics(raw)
            else:
                metrics = self._sgd(module, data, config, np.random.default_rng(seed))
            return self.params_of(module), metrics

    @staticmethod
    def _train_metrics(raw: Mapping[str, Any] | None) -> dict[str, float]:
        """The metrics a fit_fn returned, named ``train_*`` (prefixed when not already)."""
        if raw is None:
            return {}
        if not isinstance(raw, Mapping):
            raise ModelError("training_failed", f"fit_fn returned {type(raw).__name__}, not a dict of metrics")
        out: dict[str, float] = {}
        for key, value in raw.items():
            name = str(key) if str(key).startswith("train_") else f"train_{key}"
            try:
                out[name] = float(value)
            except (TypeError, ValueError):
                raise ModelError("training_failed", f"fit_fn metric {key!r} is not a number: {value!r}") from None
        return out

    def _sgd(self, module: nn.Module, data: TrainData, config: TrainConfig,
             rng: np.random.Generator) -> dict[str, float]:
        """``config.epochs`` of plain minibatch SGD; with ``prox_mu > 0`` FedProx's local solver.

        The same as :meth:`NumpyModel.fit`: the gradient step is
        ``w -= lr (grad + mu (w - w_global))``, the batch order comes from
        ``rng`` and ``train_loss`` is the mean batch loss of the last epoch
        without the proximal term.
        """
        trainable = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(trainable, lr=float(config.lr))
        mu = float(config.prox_mu)
        anchor = [p.detach().clone() for p in trainable] if mu > 0 else None
        last: list[float] = []
        for _ in range(config.epochs):
            last = []
            for Xb, yb in data.epoch(rng, config.batch_size):
                optimizer.zero_grad(set_to_none=True)
                loss = self._loss(module(self._inputs(Xb)), yb)
                total = loss
                if anchor is not None:
                    prox = sum(torch.sum((p - a) ** 2) for p, a in zip(trainable, anchor))
                    total = loss + (mu / 2) * prox
                total.backward()
                optimizer.step()
                last.append(float(loss.detach()))
        return {"train_loss": float(np.mean(last))} if last else {}

    def _loss(self, out: torch.Tensor, y: np.ndarray | torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy on logits for classifiers, squared error for regression."""
        if self.classifier:
            return F.cross_entropy(out, self._labels(y), reduction=reduction)
        target = torch.tensor(np.asarray(y, dtype=np.float64), dtype=out.dtype, device=self.device).reshape(-1)
        return F.mse_loss(self._flat(out), target, reduction=reduction)

    # -- evaluation and prediction ---------------------------------------------

    def evaluate(self, params: Mapping[str, np.ndarray], X: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """``loss`` (and ``accuracy`` for classifiers), or the user's ``evaluate_fn``; {} for no rows."""
        if len(X) == 0:
            return {}
        with self._lock, torch.no_grad():
            module = self.load_params(params)
            module.eval()
            if self.evaluate_fn is not None:
                return {str(k): float(v) for k, v in dict(self.evaluate_fn(module, X, y)).items()}
            total, correct = 0.0, 0
            for start in range(0, len(X), INFERENCE_BATCH):
                out = module(self._inputs(X[start:start + INFERENCE_BATCH]))
                yb = y[start:start + INFERENCE_BATCH]
                total += float(self._loss(out, yb, reduction="sum"))
                if self.classifier:
                    correct += int((out.argmax(dim=1) == self._labels(yb)).sum())
        result = {"loss": total / len(X)}
        if self.classifier:
            result["accuracy"] = correct / len(X)
        return result

    def _outputs(self, params: Mapping[str, np.ndarray], X: np.ndarray) -> Iterator[torch.Tensor]:
        module = self.load_params(params)
        module.eval()
        for start in range(0, len(X), INFERENCE_BATCH):
            yield module(self._inputs(X[start:start + INFERENCE_BATCH]))

    def predict(self, params: Mapping[str, np.ndarray], X: np.ndarray) -> np.ndarray:
        """Class indices (int64) for classifiers, predictions (float32 [n]) for regression."""
        with self._lock, torch.no_grad():
            if self.classifier:
                parts = [out.argmax(dim=1).to("cpu", torch.int64).numpy() for out in self._outputs(params, X)]
                return np.concatenate(parts) if parts else np.zeros(0, np.int64)
            parts = [self._flat(out).to("cpu", torch.float32).numpy() for out in self._outputs(params, X)]
            return np.concatenate(parts).astype(DTYPE, copy=False) if parts else np.zeros(0, DTYPE)

    def predict_proba(self, params: Mapping[str, np.ndarray], X: np.ndarray) -> np.ndarray:
        """Softmax of the logits, float32 [n, n_outputs] (classifiers only)."""
        if not self.classifier:
            raise NotImplementedError("a regression model gives no probabilities")
        with self._lock, torch.no_grad():
            parts = [torch.softmax(out, dim=-1).to("cpu", torch.float32).numpy() for out in self._outputs(params, X)]
        return np.concatenate(parts) if parts else np.zeros((0, self.n_outputs), DTYPE)

    # -- ONNX -------------------------------------------------------------------

    def to_onnx(self, params: Mapping[str, np.ndarray]) -> bytes:
        """The module with ``params`` as ONNX bytes in fedmqtt's graph contract (aggregator/onnx_export.py).

        Input ``input`` float32 [batch, n_features] (dynamic ``batch``);
        classifiers output ``probabilities`` (softmax) and ``label`` (int64
        argmax of the logits), regression ``prediction`` float32 [batch];
        opset 17. Uses torch's TorchScript exporter (``dynamo=False``): it
        needs nothing beyond torch, whereas the torch.export-based exporter
        needs the ``onnxscript`` package, which fedmqtt does not install.
        The module must be traceable (no data-dependent Python control flow).
        """
        import torch.onnx  # only the aggregator exports

        outputs = [ONNX_PROBABILITIES, ONNX_LABEL] if self.classifier else [ONNX_PREDICTION]
        with self._lock, torch.no_grad():
            module = self.load_params(params)
            was_training = module.training
            module.eval()
            head = _OnnxHead(module, self.classifier).eval()
            probe = torch.zeros(PROBE_ROWS, self.n_features, dtype=self._dtype, device=self.device)
            buf = io.BytesIO()
            try:
                with warnings.catch_warnings():
                    # The TorchScript exporter is deprecated in favour of the
                    # dynamo one; see the docstring for why it is used.
                    warnings.simplefilter("ignore", DeprecationWarning)
                    torch.onnx.export(
                        head, (probe,), buf, input_names=[ONNX_INPUT], output_names=outputs,
                        dynamic_axes={name: {0: ONNX_BATCH} for name in [ONNX_INPUT, *outputs]},
                        opset_version=ONNX_OPSET, dynamo=False,
                    )
            except Exception as exc:  # the user's module may not trace or have no ONNX equivalent
                raise ModelError("bad_model", f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from None
            finally:
                module.train(was_training)
        data = buf.getvalue()
        log.debug("exported %s to ONNX: %d bytes, opset %d", self.kind, len(data), ONNX_OPSET)
        return data

    # -- helpers ----------------------------------------------------------------

    def _inputs(self, X: np.ndarray) -> torch.Tensor:
        """A copy of ``X`` as the module's float dtype on its device (read-only arrays are fine)."""
        return torch.tensor(np.asarray(X, dtype=DTYPE), dtype=self._dtype, device=self.device)

    def _labels(self, y: np.ndarray | torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(np.asarray(y).astype(np.int64), device=self.device)

    def _flat(self, out: torch.Tensor) -> torch.Tensor:
        """A regression output [n] or [n, 1] as [n]."""
        if out.ndim == 0 or math.prod(out.shape[1:]) != 1:
            raise ModelError("bad_model", f"a regression module must return [n] or [n, 1], got {list(out.shape)}")
        return out.reshape(-1)

    def _check_output(self) -> None:
        """Run the module once on zeros: a wrong output shape is a configuration error, said now."""
        module = self.module
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                out = module(torch.zeros(PROBE_ROWS, self.n_features, dtype=self._dtype, device=self.device))
        except Exception as exc:  # the user's forward
            raise ModelError("bad_model", f"the module fails on input [{PROBE_ROWS}, {self.n_features}]: "
                                          f"{type(exc).__name__}: {exc}") from None
        finally:
            module.train(was_training)
        if not isinstance(out, torch.Tensor):
            raise ModelError("bad_model", f"the module must return one tensor, got {type(out).__name__}")
        if self.classifier and tuple(out.shape) != (PROBE_ROWS, self.n_outputs):
            raise ModelError("bad_model", f"the module returns {list(out.shape)} for {PROBE_ROWS} rows, expected "
                                          f"logits [{PROBE_ROWS}, {self.n_outputs}]")
        if not self.classifier:
            self._flat(out)

    @contextmanager
    def _rng(self, seed: int) -> Iterator[None]:
        """torch seeded with ``seed`` inside, torch's global RNG state restored after.

        torch's RNG is one per process: every model's seeded section holds
        the one process-wide lock, so two models training at once in one
        process (several agents) cannot reseed each other mid-fit.
        """
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with _TORCH_RNG_LOCK, torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec.of(self.kind, self.n_features, self.n_outputs, (), self._shapes)
