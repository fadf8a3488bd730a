"""What an agent keeps on disk: the rounds it trained for, and its outbox.

``trained.json`` lists the (round, attempt) pairs already trained, so a
restarted device never trains twice for the same attempt. ``outbox/`` holds
each update until its round is over, so an update that may not have reached
the broker is sent again after a reconnect or a restart while its round is
still open (the aggregator drops a second copy as ``duplicate``).
``accepted.json`` holds the newest model and task accepted (their ordering
keys), so a restarted device still refuses a replayed older one.
``outbox/residual.msgpack`` is the error-feedback memory of update
compression (:class:`edge_agent.compression.ErrorFeedback`): what the
compressed updates so far left unsent. It is written with each compressed
outbox entry, before it, so a restarted device carries it on.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import msgpack
import numpy as np

from . import wire
from .compression import ErrorFeedback
from .files import atomic_write

log = logging.getLogger(__name__)

_OUTBOX_FILE = re.compile(r"^r(\d+)-a(\d+)\.msgpack$")
# Trained attempts remembered; older ones are forgotten (their rounds are long
# closed, and a task never goes back in rounds).
MAX_TRAINED_REMEMBERED = 1000
ACCEPTED_FILE = "accepted.json"
# Lengths of the ordering keys: model (run, round), task (run, round, attempt, stage).
_MODEL_KEY_LEN, _TASK_KEY_LEN = 2, 4
# In outbox/ but not an outbox entry (the entry pattern above never matches it).
RESIDUAL_FILE = "residual.msgpack"


class AgentStore:
    """The on-disk state of one agent in ``state_dir``."""

    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir)
        (self.dir / "outbox").mkdir(parents=True, exist_ok=True)

    def load_trained(self) -> set[tuple[int, int]]:
        p = self.dir / "trained.json"
        try:
            return {(int(r), int(a)) for r, a in json.loads(p.read_text())}
        except FileNotFoundError:
            return set()
        except (ValueError, TypeError) as exc:
            log.warning("%s unreadable (%s); starting with no trained rounds", p, exc)
            return set()

    def save_trained(self, trained: set[tuple[int, int]]) -> None:
        keep = sorted(trained)[-MAX_TRAINED_REMEMBERED:]
        atomic_write(self.dir / "trained.json", json.dumps(keep).encode())

    def load_accepted(self) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
        """The newest (model key, task key) accepted; (None, None) for a new device."""
        p = self.dir / ACCEPTED_FILE
        try:
            d = json.loads(p.read_text())
            return _key(d["model"], _MODEL_KEY_LEN), _key(d["task"], _TASK_KEY_LEN)
        except FileNotFoundError:
            return None, None
        except (ValueError, TypeError, KeyError) as exc:
            # Like trained.json: a broken file must not stop the device; it
            # loses replay protection until the current model and task arrive.
            log.warning("%s unreadable (%s); no model or task counts as accepted yet", p, exc)
            return None, None

    def save_accepted(self, model: tuple[int, ...] | None, task: tuple[int, ...] | None) -> None:
        data = {"model": list(model) if model else None, "task": list(task) if task else None}
        atomic_write(self.dir / ACCEPTED_FILE, json.dumps(data).encode())

    def load_trusted_keys(self) -> list[str]:
        """Signing keys learned from signed key messages (on top of the configured ones)."""
        try:
            keys = json.loads((self.dir / "trusted_keys.json").read_text())
        except FileNotFoundError:
            return []
        except ValueError as exc:
            log.warning("trusted_keys.json unreadable (%s); using the configured keys only", exc)
            return []
        return [k for k in keys if isinstance(k, str)]

    def save_trusted_keys(self, keys: list[str]) -> None:
        atomic_write(self.dir / "trusted_keys.json", json.dumps(sorted(keys)).encode())

    def load_outbox(self) -> dict[tuple[int, int], bytes]:
        out = {}
        for p in (self.dir / "outbox").iterdir():
            m = _OUTBOX_FILE.match(p.name)
            if m:
                out[(int(m.group(1)), int(m.group(2)))] = p.read_bytes()
        return out

    def put_outbox(self, key: tuple[int, int], payload: bytes, feedback: ErrorFeedback | None = None) -> None:
        """Keep an update; with ``feedback`` (a compressed update) its error-feedback memory first.

        The memory goes first: a crash between the two writes loses this
        update (as a crash before either would) but never resends it later
        with the residual of the round before, which would count the part
        it sent twice.
        """
        if feedback is not None:
            self.save_feedback(feedback)
        atomic_write(self.dir / "outbox" / f"r{key[0]}-a{key[1]}.msgpack", payload)

    def save_feedback(self, fb: ErrorFeedback) -> None:
        """Persist the error-feedback memory (float32 arrays in the wire's array maps, msgpack)."""
        data = {"round": fb.round, "attempt": fb.attempt,
                "residual": wire.encode_params(fb.residual) if fb.residual is not None else None,
                "previous": wire.encode_params(fb.previous) if fb.previous is not None else None}
        atomic_write(self.dir / "outbox" / RESIDUAL_FILE, msgpack.packb(data, use_bin_type=True))

    def load_feedback(self) -> ErrorFeedback:
        """The persisted error-feedback memory; an empty one when there is none or it is unreadable."""
        p = self.dir / "outbox" / RESIDUAL_FILE
        try:
            d = wire.unpack(p.read_bytes())
            params = {k: None if d[k] is None else
                      {n: np.array(a, dtype=np.float32) for n, a in wire.decode_params(d[k], None, k).items()}
                      for k in ("residual", "previous")}
            rnd, att = d["round"], d["attempt"]
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (rnd, att)):
                raise ValueError("round and attempt must be integers")
            return ErrorFeedback(params["residual"], rnd, att, params["previous"])
        except FileNotFoundError:
            return ErrorFeedback()
        except (wire.WireError, ValueError, TypeError, KeyError) as exc:
            # Like trained.json: a broken file must not stop the device; the
            # next compressed update starts from a zero residual.
            log.warning("%s unreadable (%s); compression starts without a residual", p, exc)
            return ErrorFeedback()

    def drop_feedback(self) -> None:
        """Forget the error-feedback memory (a new federation run)."""
        (self.dir / "outbox" / RESIDUAL_FILE).unlink(missing_ok=True)

    def drop_outbox(self, key: tuple[int, int]) -> None:
        (self.dir / "outbox" / f"r{key[0]}-a{key[1]}.msgpack").unlink(missing_ok=True)


def _key(value: object, length: int) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != length or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise ValueError(f"an ordering key must be a list of {length} integers, got {value!r}")
    return tuple(value)
