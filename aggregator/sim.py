"""Many simulated agents in one process, each a real MQTT client, on one thread.

Every agent is a normal :class:`~edge_agent.agent.AgentCore` behind a normal
:class:`~edge_agent.agent.AgentRunner`: the only thing simulated is the
device. All their connections share one :class:`~edge_agent.mqtt.Loop`, so
100 agents cost one thread and 100 sockets, not 100 threads.
"""

from __future__ import annotations

import logging
import threading

from edge_agent.agent import AgentCore, AgentRunner
from edge_agent.config import BrokerConfig
from edge_agent.data import LocalData
from edge_agent.mqtt import Loop

log = logging.getLogger(__name__)


def agent_ids(n: int, prefix: str = "agent") -> list[str]:
    """The ids the simulator gives its agents: agent-000, agent-001, ..."""
    return [f"{prefix}-{i:03d}" for i in range(n)]


def agent_seed(seed: int, index: int) -> int:
    """Training seed of simulated agent ``index`` (so offline replays can match it)."""
    return seed * 100_003 + index


class Simulation:
    """N agents over one broker, driven by one Loop."""

    def __init__(
        self,
        broker: BrokerConfig,
        federation: str,
        datas: list[LocalData],
        seed: int = 0,
        prefix: str = "agent",
        loop: Loop | None = None,
        train_delay: float = 0.0,
    ) -> None:
        self.loop = loop or Loop()
        self.finished = threading.Event()
        self._done: set[str] = set()
        self.runners = [
            AgentRunner(
                self.loop,
                AgentCore(agent_id=aid, fed=federation, data=d, seed=agent_seed(seed, i)),
                broker,
                on_done=self._agent_done,
                train_delay=train_delay,
            )
            for i, (aid, d) in enumerate(zip(agent_ids(len(datas), prefix), datas))
        ]

    def _agent_done(self, runner: AgentRunner) -> None:
        self._done.add(runner.core.agent_id)
        if len(self._done) == len(self.runners):
            self.finished.set()

    def start(self) -> None:
        """Connect every agent and run the loop in a background thread."""
        for r in self.runners:
            r.start()
        self.loop.start(name="fedmqtt-sim")

    def stop(self) -> None:
        """Disconnect every agent and end the loop thread."""
        self.loop.stop()
        if self.loop.thread is not None:
            self.loop.thread.join(timeout=10)
