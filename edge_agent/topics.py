"""The one topic builder and parser (DESIGN.md §2, docs/PROTOCOL.md).

All topics of a federation live under ``fl/<federation>/``. Build them here,
never by string formatting elsewhere, so that a rename is one edit.
"""

from __future__ import annotations

from dataclasses import dataclass

from .wire import valid_id

ROOT = "fl"


@dataclass(frozen=True)
class Topics:
    """Topic names of one federation."""

    fed: str

    def __post_init__(self) -> None:
        if not valid_id(self.fed):
            raise ValueError(f"federation id {self.fed!r} must match [A-Za-z0-9_-]{{1,64}}")

    @property
    def prefix(self) -> str:
        return f"{ROOT}/{self.fed}"

    @property
    def model(self) -> str:
        return f"{self.prefix}/model"

    @property
    def model_onnx(self) -> str:
        return f"{self.prefix}/model/onnx"

    @property
    def task(self) -> str:
        return f"{self.prefix}/task"

    @property
    def metrics(self) -> str:
        return f"{self.prefix}/metrics"

    @property
    def metrics_json(self) -> str:
        """A JSON copy of ``metrics`` for dashboards and people (retained, not msgpack)."""
        return f"{self.prefix}/metrics/json"

    @property
    def keys(self) -> str:
        """The aggregator's signed list of model-signing keys (key rollover)."""
        return f"{self.prefix}/keys"

    @property
    def updates(self) -> str:
        """Subscription filter for every agent's updates."""
        return f"{self.prefix}/update/+"

    @property
    def statuses(self) -> str:
        """Subscription filter for every agent's status."""
        return f"{self.prefix}/agent/+/status"

    def update(self, agent: str) -> str:
        return f"{self.prefix}/update/{_agent(agent)}"

    def status(self, agent: str) -> str:
        return f"{self.prefix}/agent/{_agent(agent)}/status"

    def inbox(self, agent: str) -> str:
        return f"{self.prefix}/agent/{_agent(agent)}/inbox"

    def selected(self, agent: str) -> str:
        """The retained notice that ``agent`` is selected for an attempt (aggregator → that agent only)."""
        return f"{self.prefix}/agent/{_agent(agent)}/selected"

    def parse(self, topic: str) -> tuple[str, str | None]:
        """Classify a topic of this federation: (kind, agent id or None).

        kind is one of model, model/onnx, task, metrics, metrics/json, keys,
        update, status, inbox, selected, or "" for a topic that is not one of ours (including a
        malformed agent id, which a hostile client could try).
        """
        head = self.prefix + "/"
        if not topic.startswith(head):
            return "", None
        rest = topic[len(head):]
        if rest in ("model", "model/onnx", "task", "metrics", "metrics/json", "keys"):
            return rest, None
        parts = rest.split("/")
        if len(parts) == 2 and parts[0] == "update" and valid_id(parts[1]):
            return "update", parts[1]
        if len(parts) == 3 and parts[0] == "agent" and parts[2] in ("status", "inbox", "selected") and valid_id(parts[1]):
            return parts[2], parts[1]
        return "", None

    # -- chunked payloads (docs/PROTOCOL.md §8) ---------------------------------

    def update_chunks(self, agent: str) -> str:
        """Where ``agent`` sends a chunked update: its manifest, then its chunks, on one topic (so in order)."""
        return f"{self.prefix}/update/{_agent(agent)}/chunk"

    @property
    def all_update_chunks(self) -> str:
        """Subscription filter for every agent's chunked updates (``update/+`` does not match them)."""
        return f"{self.prefix}/update/+/chunk"

    def model_chunk(self, index: int) -> str:
        """Retained chunk ``index`` of a model too large for one packet (its manifest is on ``model``)."""
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise ValueError(f"chunk index must be an int >= 0, got {index!r}")
        return f"{self.prefix}/model/chunk/{index}"

    def parse_chunk(self, topic: str) -> tuple[str, str | int | None]:
        """Classify a chunk topic: ("update_chunk", agent id), ("model_chunk", index), or ("", None).

        Separate from :meth:`parse` (which returns "" for these topics, so code
        that knows nothing of chunks ignores them). An index is decimal without
        leading zeros, so one chunk has exactly one topic.
        """
        head = self.prefix + "/"
        if not topic.startswith(head):
            return "", None
        parts = topic[len(head):].split("/")
        if len(parts) == 3 and parts[0] == "update" and parts[2] == "chunk" and valid_id(parts[1]):
            return "update_chunk", parts[1]
        if (len(parts) == 3 and parts[:2] == ["model", "chunk"] and parts[2].isascii() and parts[2].isdigit()
                and (parts[2] == "0" or not parts[2].startswith("0")) and len(parts[2]) <= 9):
            return "model_chunk", int(parts[2])
        return "", None


def _agent(agent: str) -> str:
    if not valid_id(agent):
        raise ValueError(f"agent id {agent!r} must match [A-Za-z0-9_-]{{1,64}}")
    return agent
