"""Shared fixtures: a real mosquitto (from the repo's mosquitto.conf) and federation helpers.

Integration tests talk to a real broker through paho-mqtt: the session
starts one private mosquitto on a free loopback port; each test uses its own
federation id so retained messages of one test never reach another.
"""

from __future__ import annotations

import itertools
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from aggregator.broker import LocalBroker
from aggregator.config import AggregatorConfig
from aggregator.coordinator import RoundClosed
from aggregator.service import AggregatorService
from edge_agent.config import BrokerConfig
from edge_agent.mqtt import Loop

_fed_ids = itertools.count()

# Generous bound on anything a test waits for over the broker; the happy
# paths take milliseconds, so hitting it means a real hang.
WAIT_S = 30.0


@pytest.fixture(scope="session")
def broker():
    """One private mosquitto for the whole test session."""
    with LocalBroker() as b:
        yield b


@pytest.fixture
def broker_config(broker) -> BrokerConfig:
    return BrokerConfig(host=broker.host, port=broker.port)


@pytest.fixture
def fed() -> str:
    """A federation id unique to this test."""
    return f"t{next(_fed_ids)}-{int(time.time() * 1000) % 10_000_000}"


class RawClient:
    """A plain paho client for tests: publish anything, collect what arrives."""

    def __init__(self, broker: LocalBroker, client_id: str = "") -> None:
        self.messages: queue.Queue = queue.Queue()
        self.connected = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        self.topics: list[str] = []
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload, m.retain))
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self.connected.wait(WAIT_S), "test client could not connect"

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        # Subscriptions do not survive a reconnect (e.g. a broker restart): renew them here.
        for t in self.topics:
            client.subscribe(t, qos=1)
        self.connected.set()

    def subscribe(self, topic: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        self.topics.append(topic)
        self.client.subscribe(topic, qos=1)
        assert done.wait(WAIT_S)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(WAIT_S)

    def wait_for(self, topic: str, timeout: float = WAIT_S):
        """Next message on ``topic`` (others are dropped)."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"nothing arrived on {topic} within {timeout}s")
            try:
                t, payload, retain = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            if t == topic:
                return payload, retain

    def wait_for_open_task(self, topic: str, after_round: int = 0, timeout: float = WAIT_S):
        """The next open task on ``topic`` for a round later than ``after_round``."""
        from edge_agent import wire

        end = time.monotonic() + timeout
        while True:
            task = wire.decode(self.wait_for(topic, max(0.01, end - time.monotonic()))[0], expect="task")
            if task.state == "open" and task.round > after_round:
                return task

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def raw_client(broker):
    clients: list[RawClient] = []

    def make(client_id: str = "") -> RawClient:
        c = RawClient(broker, client_id)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


@dataclass
class RunningAggregator:
    """An AggregatorService on its own loop thread, with its rounds collected."""

    service: AggregatorService
    loop: Loop
    rounds: "queue.Queue[RoundClosed]" = field(default_factory=queue.Queue)
    finished: threading.Event = field(default_factory=threading.Event)

    @property
    def coordinator(self):
        return self.service.coordinator

    def wait_finished(self, timeout: float = WAIT_S) -> None:
        assert self.finished.wait(timeout), (
            f"federation did not finish within {timeout}s; "
            f"round {self.coordinator.round}, rejected {dict(self.coordinator.rejected)}"
        )

    def stop(self) -> None:
        self.loop.stop()
        if self.loop.thread is not None:
            self.loop.thread.join(10)


@pytest.fixture
def start_aggregator(tmp_path: Path):
    """Start an aggregator service for a config; stopped after the test."""
    running: list[RunningAggregator] = []

    def start(config: AggregatorConfig, evaluate=None) -> RunningAggregator:
        loop = Loop()
        ra: RunningAggregator
        holder: dict = {}

        def on_round(ev: RoundClosed) -> None:
            holder["ra"].rounds.put(ev)

        def on_finished(_f) -> None:
            holder["ra"].finished.set()

        service = AggregatorService(config, loop, evaluate=evaluate, on_round=on_round, on_finished=on_finished)
        ra = RunningAggregator(service, loop)
        holder["ra"] = ra
        service.start()
        loop.start(name="test-aggregator")
        running.append(ra)
        return ra

    yield start
    for ra in running:
        ra.stop()


def offline_fedavg(datas, cfg: AggregatorConfig, seed: int, rounds: int, extra_weight: float = 0.0):
    """The federation computed without any MQTT: every simulated agent trains every round.

    ``extra_weight`` adds, each round, a zero delta of that weight (a scripted
    device that reports without moving the model).
    """
    import numpy as np

    from aggregator.sim import agent_seed
    from aggregator.strategies import FedAvg
    from edge_agent import wire
    from edge_agent.models import BuiltinModel, subtract
    from edge_agent.training import round_seed, train_local

    model = BuiltinModel(cfg.model.spec())
    params = model.init_params(cfg.model.seed)
    t = cfg.training
    tc = wire.TrainConfig(t.epochs, t.batch_size, t.lr)
    for r in range(1, rounds + 1):
        s = FedAvg()
        s.begin(params)
        for i, d in enumerate(datas):
            local, _ = train_local(model, params, d.X_train, d.y_train, tc, round_seed(agent_seed(seed, i), r))
            s.add(subtract(local, params), float(d.num_samples))
        if extra_weight:
            s.add({k: np.zeros_like(v) for k, v in params.items()}, extra_weight)
        params = s.result(params)
    return params


def load_example(name: str, *modules: str) -> list:
    """The modules of ``examples/<name>/``, imported as the example's own scripts import each other."""
    import importlib

    folder = str(Path(__file__).resolve().parents[1] / "examples" / name)
    sys.path.insert(0, folder)
    try:
        return [importlib.import_module(m) for m in modules]
    finally:
        sys.path.remove(folder)


def deliver_task(core, task, selection=()) -> list:
    """An open sync attempt as a selected agent gets it from the broker: its retained notice, then the task.

    ``selection`` is the notice's list of the whole selection (secure aggregation only).
    Returns the actions of both messages.
    """
    from edge_agent import wire
    from edge_agent.topics import Topics

    t = Topics(task.fed)
    notice = wire.SelectedMsg(task.fed, task.round, core.agent_id, task.attempt, task.base, run=task.run,
                              selected=list(selection))
    return core.receive(t.selected(core.agent_id), wire.encode(notice)) + core.receive(t.task, wire.encode(task))
