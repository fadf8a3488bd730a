"""``fedmqtt status``: the fleet and its last rounds, from the broker's retained messages alone.

Subscribes to ``fl/<fed>/#``, collects what the broker holds (retained model,
task, metrics and every agent's status) until nothing new arrives for a
moment, and prints it. It needs no access to the aggregator or its state
directory, so an operator can run it from anywhere the broker is reachable.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from edge_agent import wire
from edge_agent.config import BrokerConfig
from edge_agent.mqtt import Connection, Loop
from edge_agent.topics import Topics

# Retained messages arrive right after SUBSCRIBE; once none has come for
# this long the broker has sent what it holds.
QUIET_S = 0.5


@dataclass
class FleetView:
    """What the broker retains about one federation."""

    fed: str
    model: wire.ModelMsg | None = None
    task: wire.TaskMsg | None = None
    metrics: wire.MetricsMsg | None = None
    agents: dict[str, wire.StatusMsg] = field(default_factory=dict)
    # Retained per-agent `selected` notices. A provisioned broker lets only
    # the aggregator and each agent itself read them: an observer sees none.
    notices: dict[str, wire.SelectedMsg] = field(default_factory=dict)
    onnx_bytes: int = 0
    undecodable: list[str] = field(default_factory=list)

    def selected(self) -> list[str] | None:
        """The agents the open task selects, sorted; None when that is not visible here.

        ``sync``: the agents whose notice names the open attempt (None when no
        notice is readable, as for an observer on a provisioned broker).
        ``async``: every eligible online agent. Nobody in a task that is not open.
        """
        t = self.task
        if t is None or t.state != "open":
            return []
        if t.mode == "async":
            return sorted(a for a, s in self.agents.items() if s.state == "online" and s.eligible)
        if not self.notices:
            return None
        key = (t.run, t.round, t.attempt, t.base)
        return sorted(a for a, n in self.notices.items() if (n.run, n.round, n.attempt, n.base) == key)


class _Collector:
    def __init__(self, fed: str) -> None:
        self.topics = Topics(fed)
        self.view = FleetView(fed)
        self.last = time.monotonic()
        self.connected = threading.Event()

    def subscriptions(self) -> list[str]:
        return [f"{self.topics.prefix}/#"]

    def on_connected(self, conn: Connection) -> None:
        self.last = time.monotonic()
        self.connected.set()

    def on_message(self, conn: Connection, topic: str, payload: bytes, props: dict[str, str]) -> None:
        self.last = time.monotonic()
        kind, agent = self.topics.parse(topic)
        if not payload or kind in ("", "update", "inbox", "metrics/json"):
            return  # (metrics/json is a JSON copy of metrics)
        if kind == "model/onnx":
            self.view.onnx_bytes = len(payload)
            return
        try:
            msg = wire.decode(payload, expect=kind, fed=self.view.fed)
        except wire.WireError as exc:
            self.view.undecodable.append(f"{topic}: {exc.reason}")
            return
        if kind == "status":
            self.view.agents[agent] = msg
        elif kind == "selected":
            self.view.notices[agent] = msg
        else:
            setattr(self.view, kind, msg)


def collect(broker: BrokerConfig, fed: str, timeout: float = 10.0) -> FleetView:
    """Everything retained under ``fl/<fed>/``; raises TimeoutError if the broker cannot be reached."""
    loop = Loop()
    c = _Collector(fed)
    conn = Connection(loop, broker, client_id="", handler=c)
    conn.open()
    loop.start(name="fedmqtt-status")
    try:
        if not c.connected.wait(timeout):
            raise TimeoutError(f"cannot reach the broker at {broker.host}:{broker.port} within {timeout:.0f}s")
        while time.monotonic() - c.last < QUIET_S:
            time.sleep(0.05)
    finally:
        loop.stop()
        if loop.thread is not None:
            loop.thread.join(5)
    return c.view


def render(v: FleetView) -> str:
    """A plain-text report of the fleet."""
    lines = [f"federation {v.fed}"]
    if v.model is None and v.task is None and not v.agents:
        return lines[0] + ": nothing retained on the broker (no aggregator has run, or another broker)\n"
    if v.model is not None:
        lines.append(f"  model    round {v.model.round}, version {v.model.version}, {v.model.spec.kind} "
                     f"{v.model.spec.layer_sizes()}" + (f", ONNX {v.onnx_bytes} bytes" if v.onnx_bytes else ""))
    if v.task is not None:
        t = v.task
        chosen = v.selected()
        what = {"open": f"round {t.round} attempt {t.attempt} open"
                        + (f", {len(chosen)} selected" if chosen is not None else "")
                        + (f", deadline in {max(0.0, t.deadline - time.time()):.0f}s" if t.deadline else ""),
                "waiting": f"waiting for agents to open round {t.round}",
                "done": f"finished after round {t.round}"}[t.state]
        lines.append(f"  task     {what} ({t.mode})")
    online = [a for a in v.agents.values() if a.state == "online"]
    eligible = [a for a in online if a.eligible]
    lines.append(f"  agents   {len(v.agents)} known, {len(online)} online, {len(eligible)} eligible")
    if v.agents:
        lines.append(f"    {'agent':<24} {'state':<8} {'eligible':<9} {'samples':>8} {'round':>6}  note")
        for name in sorted(v.agents):
            a = v.agents[name]
            lines.append(f"    {name:<24} {a.state:<8} {'yes' if a.eligible else 'no':<9} {a.num_samples:>8} "
                         f"{a.round:>6}  {a.reason}")
    m = v.metrics
    if m is not None:
        lines.append(f"  last rounds (newest last; round {m.round} had {m.participants} participants)")
        cols = ["test_accuracy", "eval_accuracy", "train_loss"]
        lines.append(f"    {'round':>5} {'updates':>8} {'selected':>8} {'seconds':>8} " + " ".join(f"{c:>13}" for c in cols))
        for h in m.history or [{"round": m.round, "participants": m.participants, **m.metrics}]:
            lines.append(
                f"    {int(h.get('round', 0)):>5} {int(h.get('participants', 0)):>8} {int(h.get('selected', 0)):>8} "
                f"{h.get('seconds', 0.0):>8.2f} " + " ".join(
                    f"{h[c]:>13.4f}" if c in h else f"{'-':>13}" for c in cols)
            )
        rejected = {k[len("rejected_"):]: int(v) for k, v in m.metrics.items() if k.startswith("rejected_")}
        if rejected:
            lines.append("  rejected " + ", ".join(f"{k}={n}" for k, n in sorted(rejected.items())))
    for u in v.undecodable:
        lines.append(f"  undecodable retained message: {u}")
    return "\n".join(lines) + "\n"
