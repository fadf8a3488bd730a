"""What a device or the aggregator does when the broker says no: over real mosquitto processes.

A refused login and a second client on the same id are configuration
errors: one line naming what to check, exit code 2, no retry loop. A
publish above the broker's packet limit is refused before it is sent
(sending it gets the client disconnected, and paho would resend it on every
reconnect), and the device says in its status that it cannot take part.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import numpy as np
import pytest

import fedmqtt
from aggregator.broker import LocalBroker
from aggregator.provision import password_hash
from edge_agent import wire
from edge_agent.topics import Topics

pytestmark = pytest.mark.broker


@pytest.fixture
def locked_broker(tmp_path):
    """A mosquitto that wants user 'car-1' with password 'right'."""
    pw = tmp_path / "passwd"
    pw.write_text(f"car-1:{password_hash('right')}\n")
    with LocalBroker(overrides={"allow_anonymous": "false", "password_file": str(pw)}) as b:
        yield b


def _agent_cmd(broker, tmp_path, *extra):
    np.savez(tmp_path / "d.npz", X=np.zeros((20, 64), np.float32), y=np.arange(20) % 10)
    return [sys.executable, "-m", "fedmqtt", "agent", "--broker", broker.address, "--federation", "errs",
            "--data", str(tmp_path / "d.npz"), "--state-dir", "", *extra]


@pytest.mark.parametrize("user, password, said", [
    # mosquitto 2.0.11 answers a wrong password with "not authorized" (135), not 134
    ("car-1", "wrong", "the broker refused user 'car-1' (not authorized)"),
    ("", "", "the broker refused an anonymous login"),
])
def test_a_refused_login_exits_2_with_one_line_naming_the_credential(locked_broker, tmp_path, user, password, said):
    t0 = time.monotonic()
    proc = subprocess.run(_agent_cmd(locked_broker, tmp_path, "--agent-id", "car-1", "--broker-username", user,
                                     "--broker-password", password), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fedmqtt agent: config error: broker: ") and said in last
    assert "check [broker] username and password" in last
    assert time.monotonic() - t0 < 30  # no retry loop
    assert proc.stderr.count("refused") <= 3  # said once (log line + final line), not once per retry


def test_the_right_password_connects(locked_broker, tmp_path):
    """The guard for the test above: the same command with the right password gets in and finishes."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    c.username_pw_set("car-1", "right")
    c.connect(locked_broker.host, locked_broker.port)
    c.loop_start()
    fed = "errs"
    c.publish(Topics(fed).task, wire.encode(wire.TaskMsg(fed, 1, "v", state="done")), qos=1, retain=True).wait_for_publish(10)
    c.disconnect()
    c.loop_stop()
    proc = subprocess.run(_agent_cmd(locked_broker, tmp_path, "--agent-id", "car-1", "--broker-username", "car-1",
                                     "--broker-password", "right", "--exit-when-done", "true"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_two_devices_with_the_same_id_back_off_and_say_so_in_their_status(broker, monkeypatch):
    """mosquitto 2.0.11 closes the older connection without the v5 "session taken over" code, and so does a
    broker that restarts: three connections ended within seconds of being accepted make a device back off
    (one connection trade per back-off instead of one a second), log an error naming the id, and report
    `duplicate_id` in its retained status, so the aggregator does not select it."""
    import edge_agent.mqtt as mqtt

    monkeypatch.setattr(mqtt, "TAKEOVER_BACKOFF_S", 3.0)  # 60 s in production: keep the test short
    statuses: list = []
    observer = _subscriber(broker, Topics("errs").status("pi-7"), statuses)
    bc = fedmqtt.BrokerConfig(port=broker.port)
    data = (np.zeros((10, 4), np.float32), np.arange(10) % 2)
    make = lambda: fedmqtt.Agent(fedmqtt.AgentConfig(agent_id="pi-7", federation="errs", state_dir="", broker=bc),
                                 data=data)  # noqa: E731
    first, second = make(), make()
    try:
        first.start()
        time.sleep(1.0)
        second.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(a.runner.conn.suspected_takeover for a in (first, second)):
            time.sleep(0.05)
        suspect = next(a for a in (first, second) if a.runner.conn.suspected_takeover)
        assert "most likely another client uses client id 'fedmqtt-errs-pi-7'" in suspect.runner.conn.suspected_takeover
        assert suspect.problem[0] == "duplicate_id"
        deadline = time.monotonic() + 15  # it says so when it next connects (after the back-off)
        said = []
        while time.monotonic() < deadline and not said:
            said = [p for p in statuses if p and wire.decode(p, expect="status").reason.startswith("duplicate_id: ")]
            time.sleep(0.1)
        assert said and not wire.decode(said[0], expect="status").eligible
    finally:
        for a in (first, second):
            a.stop()
        observer.loop_stop()


def test_an_update_over_the_brokers_packet_limit_is_not_sent_and_the_device_says_why(tmp_path):
    """mosquitto max_packet_size 4096, announced in CONNACK: an update of 10 kB is refused before it is sent.

    (The aggregator's model is as large as an update, so a real round cannot
    make an update too big without the model being too big first: the update
    is handed to the agent's MQTT adapter directly, as its core would.)
    """
    from edge_agent.mqtt import Publish

    with LocalBroker(overrides={"max_packet_size": "4096"}) as b:
        bc = fedmqtt.BrokerConfig(port=b.port)
        agent = fedmqtt.Agent(fedmqtt.AgentConfig(agent_id="a1", federation="big", state_dir="", broker=bc),
                              data=(np.zeros((30, 4), np.float32), np.arange(30) % 3))
        statuses = []
        with agent:
            conn = agent.runner.conn
            deadline = time.monotonic() + 10
            while not conn.connected and time.monotonic() < deadline:
                time.sleep(0.05)
            assert conn.max_packet_size == 4096
            observer = _subscriber(b, Topics("big").status("a1"), statuses)
            update = Publish(Topics("big").update("a1"), b"\0" * 10_000)
            agent.loop.call_soon_threadsafe(lambda: agent.runner._execute([update]))  # noqa: SLF001
            deadline = time.monotonic() + 10
            while agent.problem is None and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)
            assert conn.connected  # never sent, so the broker did not disconnect us: nothing to resend in a loop
            observer.loop_stop()
        # 10,000 payload + 16 topic + 13 PUBLISH header bytes (Connection.packet_size)
        assert agent.problem == ("payload_too_large", "an update of 10029 bytes exceeds the broker's maximum packet "
                                                      "size of 4096 bytes")
        assert conn.refused_too_large == 1
        # the retained status says so, which keeps the aggregator from selecting this device
        last = wire.decode(statuses[-2] if statuses[-1] is None else statuses[-1], expect="status")
        assert not last.eligible and last.reason.startswith("payload_too_large: ")


def _subscriber(broker, topic, into):
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    c.on_message = lambda cl, u, m: into.append(bytes(m.payload) or None)
    c.connect(broker.host, broker.port)
    c.subscribe(topic, qos=1)
    c.loop_start()
    return c


def test_the_aggregator_with_a_refused_login_exits_2_too(locked_broker, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedmqtt", "aggregator", "--broker", locked_broker.address,
                           "--federation", "errs", "--state-dir", str(tmp_path / "s"), "--broker-username", "car-1",
                           "--broker-password", "wrong"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "fedmqtt aggregator: config error: broker: the broker refused user 'car-1' (not authorized): check [broker] "
        "username and password/password_file (or the client certificate, cert_file/key_file)")


# -- TLS mistakes get a hint naming the likely cause -------------------------------


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory):
    """The production broker config, provisioned for the host name mqtt.example.com only."""
    from aggregator.provision import broker_files, init

    from tests.test_security_broker import start_broker

    d = tmp_path_factory.mktemp("pki-named")
    files = init(d, "errs", ["car-1"], broker_hosts=["mqtt.example.com"])
    b = start_broker(broker_files(files.dir))
    yield b, files
    b.close()


def _connect_and_log(broker_cfg, caplog, seconds=3.0):
    from edge_agent.mqtt import Connection, Loop

    class Quiet:
        def subscriptions(self):
            return []

        def on_connected(self, conn):
            pass

        def on_message(self, *a):
            pass

    loop = Loop()
    conn = Connection(loop, broker_cfg, "probe-client", Quiet())
    with caplog.at_level(logging.INFO, logger="edge_agent.mqtt"):
        conn.open()
        loop.start()
        time.sleep(seconds)
        loop.stop()
        loop.thread.join(10)
    return conn, "\n".join(r.getMessage() for r in caplog.records)


def test_a_tls_port_reached_without_tls_gets_a_hint(tls_broker, caplog):
    broker, _ = tls_broker
    conn, text = _connect_and_log(fedmqtt.BrokerConfig(host=broker.host, port=broker.port), caplog)
    assert not conn.connected
    assert "closed the connection before answering; if that port needs TLS, set [broker] tls = true" in text


def test_a_certificate_for_another_host_name_gets_a_hint(tls_broker, caplog):
    broker, files = tls_broker
    cfg = fedmqtt.BrokerConfig(host="127.0.0.1", port=broker.port, tls=True, ca_file=str(files.ca_cert))
    conn, text = _connect_and_log(cfg, caplog)
    assert not conn.connected
    assert "the broker's TLS certificate is not valid for host name '127.0.0.1'" in text


def test_tls_to_a_plain_port_gets_a_hint(broker, caplog, tls_broker):
    _, files = tls_broker
    cfg = fedmqtt.BrokerConfig(host=broker.host, port=broker.port, tls=True, ca_file=str(files.ca_cert))
    conn, text = _connect_and_log(cfg, caplog)
    assert not conn.connected
    assert "if this port does not use TLS, set [broker] tls = false" in text


def test_an_aggregator_whose_model_exceeds_the_brokers_packet_limit_stops_and_says_why(tmp_path):
    with LocalBroker(overrides={"max_packet_size": "4096"}) as b:
        cfg = fedmqtt.AggregatorConfig(federation="bigm", rounds=1, state_dir=str(tmp_path / "agg"),
                                       broker=fedmqtt.BrokerConfig(port=b.port))
        cfg.model.kind, cfg.model.hidden, cfg.onnx.every = "mlp", [64], 0  # ~20 kB of parameters
        agg = fedmqtt.Aggregator(cfg)
        agg.start()
        with pytest.raises(fedmqtt.ConfigError, match="the model message of .* bytes exceeds the broker's maximum "
                                                      "packet size of 4096 bytes"):
            agg.wait(20)
        agg.stop()
