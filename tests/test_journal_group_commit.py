"""Group commit: the updates of one read pass share one fsync, and none is acknowledged before it.

No broker here: the real AggregatorService, Connection, Loop read pass and
JournalFile run against a socket pair that stands in for the broker's socket
(one byte per queued MQTT message) and a paho client whose ``loop_read``
hands over one queued message per call and whose ``ack`` is recorded.
``os.fsync`` is counted (and still done). The kill -9 of a real process
between a batch's write and its fsync is in tests/test_durability.py.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
from collections import deque
from types import SimpleNamespace

import numpy as np
import paho.mqtt.client as paho
import pytest

from aggregator.config import AggregatorConfig, ModelConfig, OnnxConfig, RoundConfig, SecurityConfig
from aggregator.journal import JOURNAL_NAME, JournalFile
from aggregator.service import AggregatorService
from edge_agent import mqtt, wire
from edge_agent.config import BrokerConfig
from edge_agent.mqtt import Loop
from edge_agent.topics import Topics

FED = "gc"
T = Topics(FED)


class Harness:
    """An AggregatorService with an open round of ``n_agents``, fed through a fake broker socket."""

    def __init__(self, tmp_path, monkeypatch, n_agents: int = 8) -> None:
        self.state = tmp_path / "state"
        cfg = AggregatorConfig(
            federation=FED, rounds=2, state_dir=str(self.state),
            model=ModelConfig(kind="linear", n_features=1, n_outputs=1),
            round=RoundConfig(min_agents=n_agents, quorum=n_agents, timeout=60.0),
            security=SecurityConfig(probe_open_broker=False, rate_limit=0.0),
            onnx=OnnxConfig(every=0), broker=BrokerConfig(host="127.0.0.1", port=1),  # never dialled
        )
        self.loop = Loop()
        self.svc = AggregatorService(cfg, self.loop, clock=lambda: 1000.0)
        self.conn = self.svc.conn
        # In order: ("fsync", agents whose update records it made durable) for the journal,
        # ("other fsync",) for checkpoint files, ("ack", mid), ("publish", topic).
        self.events: list[tuple] = []
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            real_fsync(fd)
            fh = self.svc.journal._fh
            self.events.append(("fsync", self.journaled_agents()) if fh is not None and fd == fh.fileno()
                               else ("other fsync",))

        monkeypatch.setattr(os, "fsync", fsync)
        self.broker_side, self.sock = socket.socketpair()
        self.sock.setblocking(False)
        self.queued: deque = deque()
        client = self.conn.client
        client.loop_read = self._loop_read
        client.socket = lambda: self.sock
        client.ack = lambda mid, qos: self.events.append(("ack", mid))
        inner_publish = self.conn.publish
        self.conn.publish = lambda msg: (self.events.append(("publish", msg.topic)), inner_publish(msg))[1]
        self.conn.connected = True
        self.svc.on_connected(self.conn)
        for i in range(n_agents):
            status = wire.StatusMsg(FED, 0, self.agent(i), "online", 1, ["linear"])
            self.svc.on_message(self.conn, T.status(self.agent(i)), wire.encode(status), {})
        self.svc._execute(self.svc.coordinator.tick(1000.0))
        assert self.svc.coordinator.open is not None and len(self.svc.coordinator.open.selected) == n_agents
        self.events.clear()
        self._mid = 0
        self.mids: dict[int, str] = {}  # mid -> agent of the update it carried

    @staticmethod
    def agent(i: int) -> str:
        return f"dev{i}"

    def journaled_agents(self) -> set[str]:
        return {r["agent"] for r in JournalFile(self.state).load() if r["type"] == "update"}

    def _loop_read(self, max_packets: int = 1) -> int:
        if not self.sock.recv(1):
            return paho.MQTT_ERR_CONN_LOST
        self.conn._on_message(self.conn.client, None, self.queued.popleft())
        return paho.MQTT_ERR_SUCCESS

    def send(self, topic: str, payload: bytes) -> int:
        """The broker delivers one QoS 1 message: it waits in the socket for a read pass."""
        self._mid += 1
        m = paho.MQTTMessage(self._mid, topic.encode())
        m.payload, m.qos = payload, 1
        self.queued.append(m)
        self.broker_side.send(b"x")
        return self._mid

    def send_update(self, i: int) -> int:
        c = self.svc.coordinator
        delta = {"W0": np.array([[float(i)]], np.float32), "b0": np.array([1.0], np.float32)}
        upd = wire.UpdateMsg(FED, c.open.round, self.agent(i), c.version, 1, delta, {})
        mid = self.send(T.update(self.agent(i)), wire.encode(upd))
        self.mids[mid] = self.agent(i)
        return mid

    def read_pass(self) -> None:
        """What the Loop does when select() reports the socket readable."""
        self.loop._serve([(SimpleNamespace(data=self.conn), selectors.EVENT_READ)])

    def fsyncs(self) -> int:
        return sum(e[0] == "fsync" for e in self.events)

    def acked(self) -> list[int]:
        return [e[1] for e in self.events if e[0] == "ack"]

    def assert_no_ack_before_durable(self) -> None:
        durable: set[str] = set()
        for e in self.events:
            if e[0] == "fsync":
                durable = e[1]
            elif e[0] == "ack" and e[1] in self.mids:
                assert self.mids[e[1]] in durable, f"message {e[1]} acknowledged before its record was fsynced"

    def close(self) -> None:
        self.broker_side.close()
        self.sock.close()


@pytest.fixture
def harness(tmp_path, monkeypatch):
    h = Harness(tmp_path, monkeypatch)
    yield h
    h.close()


def test_updates_arriving_in_one_read_pass_share_one_fsync_and_are_acked_after_it(harness):
    h = harness
    before = h.svc.journal.fsyncs
    mids = [h.send_update(i) for i in range(5)]
    h.read_pass()
    assert len(h.svc.coordinator.open.received) == 5
    assert h.fsyncs() == 1
    assert h.events[0] == ("fsync", {h.agent(i) for i in range(5)})  # all five records, before any ack
    assert h.acked() == mids
    h.assert_no_ack_before_durable()
    assert h.svc.journal.fsyncs == before + 1 and h.svc.journal.unsynced_records == 0


def test_one_update_per_pass_is_one_fsync_per_update(harness):
    h = harness
    mids = []
    for i in range(3):
        mids.append(h.send_update(i))
        h.read_pass()
    assert h.fsyncs() == 3 and h.acked() == mids
    h.assert_no_ack_before_durable()


def test_a_batch_is_bounded(harness, monkeypatch):
    h = harness
    monkeypatch.setattr(mqtt, "MAX_ACK_BATCH", 2)
    mids = [h.send_update(i) for i in range(5)]
    passes = 0
    while h.queued:
        h.read_pass()
        passes += 1
    assert passes == 3 and h.fsyncs() == 3  # 2 + 2 + 1
    assert h.acked() == mids
    h.assert_no_ack_before_durable()


def test_the_byte_bound_ends_a_batch(harness, monkeypatch):
    h = harness
    monkeypatch.setattr(mqtt, "MAX_ACK_BATCH_BYTES", 1)  # every update payload reaches it
    mids = [h.send_update(i) for i in range(3)]
    h.read_pass()
    assert h.fsyncs() == 1 and h.acked() == mids[:1] and len(h.queued) == 2  # the pass ended at the bound
    h.read_pass()
    h.read_pass()
    assert h.fsyncs() == 3 and h.acked() == mids
    h.assert_no_ack_before_durable()


def test_messages_that_journal_nothing_are_acked_without_an_fsync(harness):
    h = harness
    status = wire.StatusMsg(FED, 0, h.agent(0), "online", 2, ["linear"])
    mids = [h.send(T.status(h.agent(0)), wire.encode(status)), h.send(T.update("stranger"), b"not msgpack")]
    h.read_pass()
    assert h.fsyncs() == 0 and h.acked() == mids


def test_records_are_durable_before_anything_is_published(harness):
    """The open record of the next round is fsynced before its task leaves (write-ahead, not only before acks)."""
    h = harness
    for i in range(8):
        h.send_update(i)  # the eighth closes round 1: checkpoint, model, metrics, open round 2, task
    h.read_pass()
    assert h.svc.coordinator.round == 1 and h.svc.coordinator.open.round == 2
    model, task = h.events.index(("publish", T.model)), h.events.index(("publish", T.task))
    assert ("other fsync",) in h.events[:model]  # the checkpoint, before the new model
    assert [e for e in h.events[model:task] if e[0] == "fsync"], "the task left before the open record's fsync"
    assert [(r["type"], r["round"]) for r in JournalFile(h.state).load()] == [("open", 2)]
    # The eight updates' records were covered by the checkpoint; acked after everything else.
    assert h.acked() == list(range(1, 9))
    assert min(i for i, e in enumerate(h.events) if e[0] == "ack") > task


def test_a_failed_fsync_acknowledges_nothing_and_stops_the_service(harness, monkeypatch):
    h = harness

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    h.send_update(0)
    h.send_update(1)
    h.read_pass()  # the exception is logged, not raised into the loop
    assert h.acked() == []
    assert h.svc.fatal is not None and "Input/output error" in h.svc.fatal and JOURNAL_NAME in h.svc.fatal
    # Never trusted again: a later fsync that "works" must not lead to acks either.
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    h.send_update(2)
    h.read_pass()
    assert h.acked() == []


class _FullDisk:
    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        return -1

    def close(self) -> None:
        pass


def test_a_failed_write_acknowledges_nothing(harness):
    h = harness
    h.svc.journal._fh = _FullDisk()
    h.send_update(0)
    h.read_pass()
    assert h.acked() == [] and h.fsyncs() == 0
    assert h.svc.fatal is not None and "No space left" in h.svc.fatal


# -- the journal alone ---------------------------------------------------------------


def test_append_without_sync_writes_through_to_the_os_and_sync_fsyncs_once(tmp_path, monkeypatch):
    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd)))
    j = JournalFile(tmp_path)
    sizes = [j.append({"type": "update", "agent": f"a{i}", "payload": bytes(100 * i)}, sync=False) for i in range(3)]
    assert calls == [] and j.unsynced_records == 3 and j.unsynced_bytes == sum(sizes)
    assert [r["agent"] for r in JournalFile(tmp_path).load()] == ["a0", "a1", "a2"]  # a kill -9 keeps them
    assert j.sync() is True and len(calls) == 1 and j.unsynced_records == 0
    assert j.sync() is False and len(calls) == 1  # nothing new: no fsync
    j.append({"type": "abandon"})  # sync=True: the old behaviour, one fsync per record
    assert len(calls) == 2 and j.fsyncs == 2
    j.close()


@pytest.mark.parametrize("cut", ["in_length", "in_body", "after_first_unsynced"])
def test_a_torn_tail_of_an_unsynced_batch_is_dropped_on_load(tmp_path, cut):
    """A power cut keeps an arbitrary prefix of what was written after the last fsync."""
    j = JournalFile(tmp_path)
    j.append({"type": "open", "round": 1})  # durable
    synced = j.path.stat().st_size
    sizes = [j.append({"type": "update", "agent": f"a{i}", "payload": bytes(1000)}, sync=False) for i in range(3)]
    j.close()
    keep = {"in_length": synced + 2, "in_body": synced + sizes[0] // 2,
            "after_first_unsynced": synced + sizes[0] + sizes[1] - 7}[cut]
    with open(j.path, "r+b") as fh:
        fh.truncate(keep)
    records = JournalFile(tmp_path).load()
    expected = ["open"] + (["update"] if cut == "after_first_unsynced" else [])
    assert [r["type"] for r in records] == expected


def test_records_appended_after_a_torn_tail_survive_the_next_load(tmp_path):
    """A restart after a torn tail cuts it off, so what is journaled (and acknowledged) next is read back."""
    from aggregator.journal import JournalFile

    j = JournalFile(tmp_path)
    j.append({"i": 0})
    j.append({"i": 1})
    j.close()
    with open(j.path, "ab") as fh:  # a crash in the middle of writing record 2
        fh.write(b"\x00\x00\x00\x40half a rec")
    j2 = JournalFile(tmp_path)
    assert [r["i"] for r in j2.load()] == [0, 1]
    j2.append({"i": 99})  # acknowledged after the restart
    j2.close()
    assert [r["i"] for r in JournalFile(tmp_path).load()] == [0, 1, 99]
