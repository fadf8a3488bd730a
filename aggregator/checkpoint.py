"""Atomic checkpoints of the aggregator's state, and the plain model ``.npz``.

A checkpoint is one ``.npz`` (numpy's zip of arrays, read back with
``allow_pickle=False``): every parameter as ``param/<name>`` and the rest of
the state as JSON in a ``meta`` byte array. It is written to a temporary
file, fsynced, renamed over the old one and the directory fsynced, so a
crash at any instant leaves either the old checkpoint or the new one.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from edge_agent.files import atomic_write

__all__ = ["atomic_write", "load", "load_global_model", "save", "save_model"]

CHECKPOINT_NAME = "checkpoint.npz"
FORMAT = "fedmqtt-checkpoint-1"


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def save(state_dir: str | Path, state: Mapping[str, Any]) -> Path:
    """Write the coordinator snapshot atomically into ``state_dir``; return the path."""
    meta = {k: v for k, v in state.items() if k != "params"}
    meta["format"] = FORMAT
    meta["param_names"] = list(state["params"])
    arrays = {f"param/{k}": np.asarray(v) for k, v in state["params"].items()}
    # Strategy state (momentum, moments) holds arrays: they go into the npz,
    # the JSON keeps their names.
    strategy = dict(meta.get("strategy", {}))
    flat = dict(strategy.get("state", {}))
    strategy["array_names"] = [k for k, v in flat.items() if isinstance(v, np.ndarray)]
    for k in strategy["array_names"]:
        arrays[f"strategy/{k}"] = flat.pop(k)
    strategy["state"] = flat
    meta["strategy"] = strategy
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path = Path(state_dir) / CHECKPOINT_NAME
    atomic_write(path, _npz_bytes(arrays))
    return path


def load(state_dir: str | Path) -> dict[str, Any] | None:
    """The last checkpoint in ``state_dir``, or None when there is none."""
    path = Path(state_dir) / CHECKPOINT_NAME
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(bytes(f["meta"]).decode())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} file")
        meta["params"] = {k: f[f"param/{k}"] for k in meta.pop("param_names")}
        strategy = meta.get("strategy", {})
        for k in strategy.pop("array_names", []):
            strategy.setdefault("state", {})[k] = f[f"strategy/{k}"]
    return meta


def save_model(path: str | Path, spec: Mapping[str, Any], params: Mapping[str, np.ndarray], **info: Any) -> None:
    """Write a global model as a plain ``.npz``: its arrays plus ``spec`` and ``info`` as JSON."""
    arrays = {k: np.asarray(v) for k, v in params.items()}
    arrays["spec"] = np.frombuffer(json.dumps({"spec": dict(spec), **info}).encode(), dtype=np.uint8)
    atomic_write(path, _npz_bytes(arrays))


def load_global_model(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
    """(spec map, params, info) from a state directory, a checkpoint.npz or a model .npz.

    ``info`` has federation, round and version. Raises ValueError naming the
    file when it is none of these.
    """
    p = Path(path)
    if p.is_dir():
        state = load(p)
        if state is None:
            raise ValueError(f"{p}: no {CHECKPOINT_NAME} in this directory")
        return state["spec"], state["params"], _info(state)
    if not p.is_file():
        raise ValueError(f"{p}: no such file or directory")
    try:
        with np.load(p, allow_pickle=False) as f:
            if "meta" in f.files:
                return _from_checkpoint_file(p)
            if "spec" not in f.files:
                raise ValueError(f"{p}: neither a fedmqtt checkpoint nor a model .npz (no 'meta' or 'spec')")
            meta = json.loads(bytes(f["spec"]).decode())
            params = {k: f[k] for k in f.files if k != "spec"}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{p}: cannot read ({exc})") from None
    return meta["spec"], params, _info(meta)


def _from_checkpoint_file(p: Path) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
    if p.name != CHECKPOINT_NAME:
        raise ValueError(f"{p}: a checkpoint file must be named {CHECKPOINT_NAME} (or pass its directory)")
    state = load(p.parent)
    assert state is not None
    return state["spec"], state["params"], _info(state)


def _info(m: Mapping[str, Any]) -> dict[str, Any]:
    return {"federation": m.get("federation", ""), "round": int(m.get("round", 0)), "version": m.get("version", "")}
