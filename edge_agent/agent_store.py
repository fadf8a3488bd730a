"""What an agent keeps on disk: the rounds it trained for, and its outbox.

``trained.json`` lists the (round, attempt) pairs already trained, so a
restarted device never trains twice for the same attempt. ``outbox/`` holds
each update until its round is over, so an update that may not have reached
the broker is sent again after a reconnect or a restart while its round is
still open (the aggregator drops a second copy as ``duplicate``).
``accepted.json`` holds the newest model and task accepted (their ordering
keys), so a restarted device still refuses a replayed older one.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from .files import atomic_write

log = logging.getLogger(__name__)

_OUTBOX_FILE = re.compile(r"^r(\d+)-a(\d+)\.msgpack$")
# Trained attempts remembered; older ones are forgotten (their rounds are long
# closed, and a task never goes back in rounds).
MAX_TRAINED_REMEMBERED = 1000
ACCEPTED_FILE = "accepted.json"
# Lengths of the ordering keys: model (run, round), task (run, round, attempt, stage).
_MODEL_KEY_LEN, _TASK_KEY_LEN = 2, 4


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

    def put_outbox(self, key: tuple[int, int], payload: bytes) -> None:
        atomic_write(self.dir / "outbox" / f"r{key[0]}-a{key[1]}.msgpack", payload)

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
