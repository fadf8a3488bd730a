"""Turning a configured model name into a model object.

``kind`` is one of the built-in numpy models (``softmax``, ``mlp``,
``linear``), ``"package.module:ClassName"``, or the name of a class
registered under the ``fedmqtt.models`` entry point group by an installed
package. Only the device's and the aggregator's **own configuration**
reaches this module: a model spec received over MQTT is compared with the
locally configured model, never loaded, so no message can make a device
import code.
"""

from __future__ import annotations

import importlib
import logging
from importlib import metadata
from typing import Any, Mapping

from .model_api import FedModel, ModelError
from .models import BuiltinModel
from .spec import MODEL_KINDS, ModelSpec, custom_kind

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "fedmqtt.models"


def load_model(kind: str, options: Mapping[str, Any] | None = None, *, n_features: int = 0, n_outputs: int = 0,
               hidden: tuple[int, ...] | list[int] = ()) -> FedModel:
    """The model named ``kind``, built with ``options`` (a custom class gets them as keyword arguments).

    Built-in kinds take their sizes from ``n_features``, ``n_outputs`` and
    ``hidden``. Raises ModelError (``unknown_model`` or ``bad_model``) with
    a message naming the kind and the problem.
    """
    if kind in MODEL_KINDS:
        if options:
            raise ModelError("bad_model", f"model {kind!r} takes no options, got {sorted(options)}")
        try:
            return BuiltinModel(ModelSpec(kind, n_features, n_outputs, tuple(hidden)))
        except ValueError as exc:
            raise ModelError("bad_model", f"model {kind!r}: {exc}") from None
    if not custom_kind(kind):
        raise ModelError("unknown_model", f"model kind {kind!r} is neither built in ({', '.join(MODEL_KINDS)}) "
                                          "nor 'package.module:ClassName' nor an entry-point name")
    cls = _resolve(kind)
    try:
        model = cls(**dict(options or {}))
    except Exception as exc:  # the user's constructor: any failure is a configuration problem
        raise ModelError("bad_model", f"model {kind!r}: {cls.__name__}({_args(options)}) failed: "
                                      f"{type(exc).__name__}: {exc}") from None
    return _checked(model, kind, f"model {kind!r}: {cls.__name__}")


def named(model: FedModel) -> FedModel:
    """A model instance given in Python, with its ``kind`` set: its own, else ``module:ClassName``.

    The aggregator and the agents must then name the same class, which they
    do when both pass an instance of it or configure that name.
    """
    kind = getattr(model, "kind", "") or f"{type(model).__module__}:{type(model).__qualname__}"
    return _checked(model, kind, type(model).__name__)


def _checked(model: Any, kind: str, what: str) -> FedModel:
    """``model`` named ``kind``, if it implements the interface and its spec is valid; else ModelError."""
    if not isinstance(model, FedModel):
        raise ModelError("bad_model", f"{what} does not implement fedmqtt.Model "
                                      "(subclass fedmqtt.Model or fedmqtt.NumpyModel)")
    model.kind = kind  # the configured name is what the wire carries and both sides compare
    try:
        model.spec  # noqa: B018 - checks names, shapes and sizes
    except (ValueError, TypeError) as exc:
        raise ModelError("bad_model", f"model {kind!r}: {exc}") from None
    return model


def _resolve(kind: str) -> type:
    if ":" in kind:
        module_name, _, attr = kind.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ModelError("unknown_model", f"model {kind!r}: cannot import {module_name} ({exc})") from None
        cls = getattr(module, attr, None)
        if not isinstance(cls, type):
            raise ModelError("unknown_model", f"model {kind!r}: {module_name} has no class {attr}")
        return cls
    found = [ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == kind]
    if not found:
        raise ModelError("unknown_model", f"model {kind!r}: no such built-in model, no entry point of that name in "
                                          f"group {ENTRY_POINT_GROUP!r}; use 'package.module:ClassName'")
    try:
        cls = found[0].load()
    except Exception as exc:  # a broken plugin package
        raise ModelError("unknown_model", f"model {kind!r}: entry point {found[0].value} fails to load: {exc}") from None
    if not isinstance(cls, type):
        raise ModelError("unknown_model", f"model {kind!r}: entry point {found[0].value} is not a class")
    return cls


def _args(options: Mapping[str, Any] | None) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in (options or {}).items())


def model_for_spec(spec: ModelSpec, local: FedModel | None = None) -> FedModel:
    """The model to train for a spec received on the wire: the locally configured custom model, else a built-in.

    Raises ModelError (``incompatible_model`` or ``unsupported_model``)
    when the spec is not what this device can train; never imports anything.
    """
    if local is not None:
        if spec.kind != local.kind:
            raise ModelError("incompatible_model", f"the federation trains {spec.kind!r}, this device is "
                                                   f"configured for {local.kind!r}")
        if spec != local.spec:
            raise ModelError("incompatible_model", f"model {spec.kind!r}: the federation's parameters "
                                                   f"{_shapes(spec)} differ from this device's {_shapes(local.spec)}")
        return local
    if not spec.builtin:
        raise ModelError("unsupported_model", f"model kind {spec.kind!r} is not built in and this device has no "
                                              "[model] kind configured")
    return BuiltinModel(spec)


def _shapes(spec: ModelSpec) -> str:
    shapes = spec.param_shapes()
    text = ", ".join(f"{k}{list(v)}" for k, v in list(shapes.items())[:6])
    return f"[{text}{', ...' if len(shapes) > 6 else ''}]"
