"""``[broker] protocol = "3.1.1"``: the config, the packets a 3.1.1 Connection sends, a federation over it.

docs/PROTOCOL.md §1.1: clean session instead of clean start + session
expiry, no CONNECT or PUBLISH properties (so no signatures: refused at
config time), no announced packet limit (``[broker] max_packet_size``),
failover addresses of a cluster.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from aggregator.broker_probe import probe_anonymous_publish
from aggregator.config import AggregatorConfig, ModelConfig, RoundConfig, TrainingConfig
from aggregator.datasets import federated_digits
from aggregator.sim import Simulation
from edge_agent.agent_config import AgentConfig
from edge_agent.config import BrokerConfig, ConfigError, from_dict, load
from edge_agent.mqtt import Connection, Loop, Publish

from .conftest import WAIT_S

FEDMQTT = str(Path(sys.executable).parent / "fedmqtt")
KEY_HEX = "ab" * 32  # any well-formed Ed25519 public key (64 hex digits)


# ---------------------------------------------------------------------------
# config


def test_protocol_defaults_to_5_and_accepts_3_1_1():
    assert BrokerConfig().protocol == "5" and BrokerConfig().mqtt5
    b = from_dict(BrokerConfig, {"protocol": "3.1.1"}, "broker")
    assert b.protocol == "3.1.1" and not b.mqtt5


@pytest.mark.parametrize("value, said", [("4", "broker.protocol: must be one of '5', '3.1.1'"),
                                         ("v5", "broker.protocol: must be one of"),
                                         (5, "broker.protocol: expected a string")])
def test_a_bad_protocol_names_the_key(value, said):
    with pytest.raises(ConfigError, match=said):
        from_dict(BrokerConfig, {"protocol": value}, "broker")


def test_failover_addresses_are_checked_and_tried_after_host_port():
    b = from_dict(BrokerConfig, {"port": 1884, "failover": ["10.0.0.2:1883", "nats-3:1885"]}, "broker")
    assert b.addresses() == [("127.0.0.1", 1884), ("10.0.0.2", 1883), ("nats-3", 1885)]
    with pytest.raises(ConfigError, match=r"broker.failover\[1\]: expected HOST:PORT, got 'nohost'"):
        from_dict(BrokerConfig, {"failover": ["a:1", "nohost"]}, "broker")


def test_the_flag_sets_the_protocol(tmp_path):
    cfg = load(AgentConfig, None, {"agent_id": "a1", "broker.protocol": "3.1.1"})
    assert cfg.broker.protocol == "3.1.1"


def test_signing_is_refused_on_3_1_1_with_a_clear_error(tmp_path):
    key = tmp_path / "signing.key"
    key.write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"security.signing_key: signatures travel as MQTT 5 user properties"):
        from_dict(AggregatorConfig, {"security": {"signing_key": str(key)}, "broker": {"protocol": "3.1.1"}})


def test_pinned_keys_are_refused_on_3_1_1_with_a_clear_error():
    with pytest.raises(ConfigError, match=r"security.trusted_keys: signatures travel as MQTT 5 user properties"):
        from_dict(AgentConfig, {"agent_id": "a1", "security": {"trusted_keys": [KEY_HEX]},
                                "broker": {"protocol": "3.1.1"}})
    from_dict(AgentConfig, {"agent_id": "a1", "security": {"trusted_keys": [KEY_HEX]}})  # fine on MQTT 5


def test_shared_subscription_workers_are_refused_on_3_1_1():
    load(AggregatorConfig, None, {"workers.count": "2"})  # MQTT 5: fine
    with pytest.raises(ConfigError, match=r"broker.protocol: shared subscriptions .*NATS"):
        load(AggregatorConfig, None, {"workers.count": "2", "broker.protocol": "3.1.1"})


# ---------------------------------------------------------------------------
# what a 3.1.1 Connection sends (a fake broker that records the packets)


def _read_packet(sock: socket.socket) -> tuple[int, bytes]:
    first = sock.recv(1)
    if not first:
        raise EOFError
    length, shift = 0, 0
    while True:
        b = sock.recv(1)[0]
        length |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    body = b""
    while len(body) < length:
        body += sock.recv(length - len(body))
    return first[0], body


class FakeBroker:
    """Accepts one client, answers CONNECT with a 3.1.1 CONNACK and PUBLISH QoS 1 with PUBACK, keeps the packets."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.packets: list[tuple[int, bytes]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            try:
                while True:
                    kind, body = _read_packet(conn)
                    self.packets.append((kind, body))
                    if kind >> 4 == 1:  # CONNECT
                        conn.sendall(b"\x20\x02\x00\x00")
                    elif kind >> 4 == 3 and (kind >> 1) & 3 == 1:  # PUBLISH QoS 1: PUBACK its packet id
                        topic_len = int.from_bytes(body[:2], "big")
                        conn.sendall(b"\x40\x02" + body[2 + topic_len:4 + topic_len])
                    elif kind >> 4 == 8:  # SUBSCRIBE: grant QoS 1 to each
                        n = 0
                        i = 2
                        while i < len(body):
                            i += 2 + int.from_bytes(body[i:i + 2], "big") + 1
                            n += 1
                        conn.sendall(bytes([0x90, 2 + n]) + body[:2] + b"\x01" * n)
            except (EOFError, OSError, IndexError):
                pass

    def close(self) -> None:
        self.server.close()


class Recorder:
    def __init__(self) -> None:
        self.connected = threading.Event()

    def subscriptions(self):
        return ["fl/f/update/+"]

    def on_connected(self, conn):
        self.connected.set()

    def on_message(self, *a):
        pass


def test_a_3_1_1_connection_sends_clean_session_off_and_no_properties():
    """The aggregator's connection (persistent, session expiry, Receive Maximum, manual acks) in 3.1.1."""
    fake = FakeBroker()
    loop = Loop()
    rec = Recorder()
    conn = Connection(loop, BrokerConfig(port=fake.port, protocol="3.1.1"), "fedmqtt-aggregator-f", rec,
                      clean_start=False, session_expiry_s=86400, manual_ack=True, receive_maximum=65535)
    try:
        conn.open()
        loop.start()
        assert rec.connected.wait(WAIT_S)
        done = threading.Event()

        def publish() -> None:
            conn.publish(Publish("fl/f/model/onnx", b"onnx-bytes", qos=1, retain=True,
                                 user_properties=(("round", "1"),), content_type="application/onnx"))
            done.set()

        loop.call_soon_threadsafe(publish)
        assert done.wait(WAIT_S)
        end = time.monotonic() + WAIT_S
        while not any(k >> 4 == 3 for k, _ in fake.packets) and time.monotonic() < end:
            time.sleep(0.01)
    finally:
        loop.stop()
        loop.thread and loop.thread.join(10)
        fake.close()
    kind, connect = fake.packets[0]
    assert kind >> 4 == 1
    assert connect[:7] == b"\x00\x04MQTT\x04"  # protocol name and level 4: MQTT 3.1.1
    flags = connect[7]
    assert not flags & 0x02  # clean session off: a persistent session (3.1.1 has no expiry to send)
    # 3.1.1 has no property length after the keepalive: the client id follows at once.
    cid = b"fedmqtt-aggregator-f"
    assert connect[10:12 + len(cid)] == len(cid).to_bytes(2, "big") + cid
    assert conn.max_packet_size == 0  # nothing announced in a 3.1.1 CONNACK
    kind, publish = next(p for p in fake.packets if p[0] >> 4 == 3)
    assert (kind >> 1) & 3 == 1 and kind & 1  # QoS 1, retained
    topic = b"fl/f/model/onnx"
    # topic, packet id, then the payload: no property length, no user properties, no content type
    assert publish == len(topic).to_bytes(2, "big") + topic + publish[2 + len(topic):4 + len(topic)] + b"onnx-bytes"
    assert not any((k >> 1) & 3 == 2 for k, _ in fake.packets if k >> 4 == 3)  # never QoS 2


def test_an_mqtt5_client_at_a_3_1_1_only_broker_is_told_to_switch(caplog):
    """A NATS server answers an MQTT 5 CONNECT with 'unsupported protocol version': fatal, with the fix."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        c, _ = server.accept()
        with c:
            _read_packet(c)
            c.sendall(b"\x20\x03\x00\x84\x00")  # MQTT 5 CONNACK, reason 0x84 unsupported protocol version
            time.sleep(0.5)

    threading.Thread(target=serve, daemon=True).start()
    loop = Loop()
    conn = Connection(loop, BrokerConfig(port=port), "a-client", Recorder())
    conn.open()
    loop.start()
    loop.thread.join(WAIT_S)
    server.close()
    assert conn.fatal and 'set [broker] protocol = "3.1.1"' in conn.fatal


# ---------------------------------------------------------------------------
# a federation with every client on 3.1.1, over the test mosquitto


@pytest.mark.broker
def test_a_federation_with_every_client_on_3_1_1(fed, broker, tmp_path, start_aggregator):
    b311 = BrokerConfig(host=broker.host, port=broker.port, protocol="3.1.1", max_packet_size=8 * 1024 * 1024)
    data = federated_digits(4, "iid", 0.5, 2)
    cfg = AggregatorConfig(
        federation=fed, rounds=2, state_dir=str(tmp_path / "state"),
        model=ModelConfig(kind="softmax", n_features=64, n_outputs=10),
        training=TrainingConfig(epochs=1, batch_size=16, lr=0.1),
        round=RoundConfig(min_agents=3, quorum=1, timeout=WAIT_S),
        broker=b311,
    )
    ra = start_aggregator(cfg)
    sim = Simulation(b311, fed, data.agents[:3], seed=2)
    sim.start()
    try:
        ra.wait_finished()
        assert sim.finished.wait(WAIT_S)
        # The status command and the ONNX follower on 3.1.1 read the retained messages.
        proc = subprocess.run([FEDMQTT, "status", "--broker", broker.address, "--broker-protocol", "3.1.1",
                               "--federation", fed], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "finished after round 2" in proc.stdout and "3 known" in proc.stdout
        from aggregator.serve_onnx import OnnxFollower

        follower = OnnxFollower(b311, fed)
        follower.start()
        try:
            model = follower.wait_for_model(WAIT_S)
        finally:
            follower.stop()
        assert model is not None and model.round == 2  # from the metadata inside the file, not properties
    finally:
        sim.stop()
    assert [ra.rounds.get_nowait().summary.participants for _ in range(2)] == [3, 3]
    assert not ra.coordinator.rejected
    # The probe speaks 3.1.1 too, and says what a 3.1.1 PUBACK cannot tell.
    r = probe_anonymous_publish(b311, fed)
    assert r.open is True and "MQTT 3.1.1" in r.detail
