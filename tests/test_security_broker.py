"""The broker enforces identity (DESIGN.md §6): provisioned credentials, TLS, the ACL.

Every test provisions with ``fedmqtt provision`` into a temporary directory
and runs the production config (deploy/mosquitto/mosquitto.conf) on a free
loopback port, its TLS, password and ACL files pointed at the provisioned
ones. Attacks are judged by what a receiver with the aggregator's
credentials sees, always next to a positive control that does arrive.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import signal
import socket
import ssl
import stat
import threading
import time
import tomllib
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from aggregator.broker import LocalBroker, render_config
from aggregator.config import AggregatorConfig, ModelConfig, RoundConfig, TrainingConfig
from aggregator.provision import (
    AGGREGATOR_USER,
    OBSERVER_USER,
    Files,
    ProvisionError,
    acl_text,
    add_agents,
    broker_files,
    init,
    password_hash,
    provision_main,
)
from edge_agent.agent import AgentCore, AgentRunner
from edge_agent.agent_config import AgentConfig
from edge_agent.config import BrokerConfig, from_dict
from edge_agent.mqtt import Loop

from .conftest import WAIT_S

pytestmark = pytest.mark.broker

REPO = Path(__file__).resolve().parents[1]
PROD_CONF = REPO / "deploy" / "mosquitto" / "mosquitto.conf"
FED = "sec"
A, B = "agent-000", "agent-001"  # what `--agents 2` names them
# How long a refused client may take to learn it was refused (milliseconds in practice).
REFUSAL_S = 5.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Files:
    """One federation provisioned through the command line: two agents and the aggregator."""
    d = tmp_path_factory.mktemp("pki")
    assert provision_main(["init", "--dir", str(d), "--fed", FED, "--agents", "2"]) == 0
    return Files(d)


@pytest.fixture(scope="module")
def rogue(tmp_path_factory) -> Files:
    """Another federation with its own CA, and an agent named like ours."""
    d = tmp_path_factory.mktemp("rogue")
    return init(d, FED, [A])


def start_broker(files: dict[str, Path], **options: str | None) -> LocalBroker:
    overrides = {k: str(v) for k, v in files.items()}
    overrides.update(options)
    return LocalBroker(conf=PROD_CONF, overrides=overrides).start()


@pytest.fixture
def secure_broker(pki):
    """The production config with the provisioned files, fresh for each test."""
    b = start_broker(broker_files(pki.dir))
    yield b
    b.close()


def password(f: Files, name: str) -> str:
    return f.client(name, "password").read_text().strip()


def creds(f: Files, name: str) -> dict:
    """A client's provisioned credentials as Probe arguments."""
    return dict(user=name, password=password(f, name), ca=f.ca_cert,
                cert=f.client(name, "crt"), key=f.client(name, "key"))


def snippet_broker(f: Files, name: str, broker: LocalBroker) -> BrokerConfig:
    """The [broker] section of the provisioned .toml snippet, aimed at the test broker."""
    data = tomllib.loads(f.client(name, "toml").read_text())
    return dataclasses.replace(from_dict(BrokerConfig, data["broker"], "broker"), host=broker.host, port=broker.port)


class Probe:
    """A raw paho v5 client: connect with whatever credentials and record what happens.

    No automatic reconnect: a refused client is refused once.
    """

    def __init__(self, broker: LocalBroker, *, user=None, password=None, ca=None, cert=None, key=None,
                 client_id: str = "", tls: bool = True, will: tuple[str, bytes] | None = None,
                 host: str | None = None) -> None:
        self.messages: queue.Queue = queue.Queue()
        self.acks: dict[int, paho.ReasonCode] = {}
        self.connack: paho.ReasonCode | None = None
        self.disconnected: paho.ReasonCode | None = None
        self.error: Exception | None = None
        self.settled = threading.Event()  # CONNACK or disconnect seen
        self._subscribed = threading.Event()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5,
                        reconnect_on_failure=False)
        if user is not None:
            c.username_pw_set(user, password)
        if tls:
            c.tls_set(ca_certs=str(ca) if ca else None, certfile=str(cert) if cert else None,
                      keyfile=str(key) if key else None)
        if will is not None:
            c.will_set(will[0], will[1], qos=1, retain=False)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = lambda _c, _u, m: self.messages.put((m.topic, bytes(m.payload), m.retain))
        c.on_publish = lambda _c, _u, mid, rc, _p: self.acks.__setitem__(mid, rc)
        c.on_subscribe = lambda *a: self._subscribed.set()
        self.client = c
        try:
            c.connect(host or broker.host, broker.port, keepalive=30)
        except (ssl.SSLError, OSError) as exc:  # a TLS handshake the client itself rejects
            self.error = exc
            self.settled.set()
            return
        c.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connack = reason_code
        self.settled.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.disconnected = reason_code
        self.settled.set()

    def outcome(self, timeout: float = REFUSAL_S) -> str:
        """'connected', 'refused: <CONNACK reason>', 'tls error: ...', 'dropped' or 'no answer'."""
        self.settled.wait(timeout)
        if self.error is not None:
            return f"tls error: {type(self.error).__name__}: {self.error}"
        if self.connack is not None:
            return "connected" if not self.connack.is_failure else f"refused: {self.connack}"
        if self.disconnected is not None:
            return "dropped"  # the broker closed the connection before any CONNACK
        return "no answer"

    def subscribe(self, *topics: str) -> None:
        for t in topics:
            self._subscribed.clear()
            self.client.subscribe(t, qos=1)
            assert self._subscribed.wait(WAIT_S), f"no SUBACK for {t}"

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> paho.ReasonCode:
        """Publish at QoS 1 and return the broker's PUBACK reason code."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(WAIT_S)
        return self.acks[info.mid]

    def received(self, until: bytes, timeout: float = WAIT_S) -> list[tuple[str, bytes]]:
        """Every (topic, payload) that arrived up to and including the payload ``until``."""
        out = []
        end = time.monotonic() + timeout
        while True:
            try:
                topic, payload, _ = self.messages.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"control message {until!r} never arrived; got {out}") from None
            out.append((topic, payload))
            if payload == until:
                return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def probe(secure_broker):
    made: list[Probe] = []

    def make(broker: LocalBroker | None = None, **kw) -> Probe:
        p = Probe(broker or secure_broker, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def connected(p: Probe) -> Probe:
    assert p.outcome() == "connected"
    return p


# -- provisioning ------------------------------------------------------------------------


def test_provision_writes_keys_certificates_passwords_and_acl(pki):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    m = json.loads(pki.manifest.read_text())
    assert m["agents"] == [A, B] and m["federation"] == FED
    secret = [pki.ca_key, pki.broker_key, pki.passwd, pki.signing_key,
              pki.observer(OBSERVER_USER, "key"), pki.observer(OBSERVER_USER, "password")]
    for name in (AGGREGATOR_USER, A, B):
        secret += [pki.client(name, "key"), pki.client(name, "password")]
    for path in secret:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    def signed_by_ca(cert) -> None:
        cert.verify_directly_issued_by(ca)

    server = x509.load_pem_x509_certificate(pki.broker_cert.read_bytes())
    signed_by_ca(server)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert isinstance(server.public_key(), ec.EllipticCurvePublicKey) and server.public_key().curve.name == "secp256r1"
    for name in (AGGREGATOR_USER, A, B):
        cert = x509.load_pem_x509_certificate(pki.client(name, "crt").read_bytes())
        signed_by_ca(cert)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        key = serialization.load_pem_private_key(pki.client(name, "key").read_bytes(), None)
        assert key.public_key() == cert.public_key()
    users = [ln.split(":", 1)[0] for ln in pki.passwd.read_text().splitlines()]
    assert users == [AGGREGATOR_USER, A, B, OBSERVER_USER]
    assert m["observers"] == [OBSERVER_USER]
    assert pki.acl.read_text() == acl_text(FED, [A, B], [OBSERVER_USER])
    rules = [ln for ln in pki.acl.read_text().splitlines() if ln and not ln.startswith("#")]
    reads = [f"topic read fl/{FED}/{t}" for t in ("model", "model/onnx", "task", "metrics", "metrics/json", "keys")]
    assert rules == [
        f"user {AGGREGATOR_USER}",
        f"topic readwrite fl/{FED}/#",
        f"user {OBSERVER_USER}",
        *[f"topic read fl/{FED}/{t}" for t in ("model", "model/onnx", "task", "metrics", "metrics/json", "keys",
                                               "agent/+/status")],
        *[line for agent in (A, B) for line in (
            f"user {agent}",
            f"topic write fl/{FED}/update/{agent}",
            f"topic write fl/{FED}/agent/{agent}/status",
            f"topic read fl/{FED}/agent/{agent}/inbox",
            f"topic read fl/{FED}/agent/{agent}/selected",
            f"topic write fl/{FED}/update/{agent}/chunk",
            f"topic read fl/{FED}/model/chunk/+",
            *reads)],
    ]
    # no pattern lines (they would apply to the observer too), no topic line before the first user line
    assert not [ln for ln in rules if ln.startswith("pattern")] and rules[0].startswith("user ")


def test_password_hash_matches_mosquitto_passwd(tmp_path):
    """Our $7$ lines are what mosquitto_passwd writes (the broker tests check it accepts them)."""
    import base64
    import shutil
    import subprocess

    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd not installed")
    f = tmp_path / "pw"
    subprocess.run([tool, "-c", "-b", str(f), "u", "s3cret"], check=True, capture_output=True)
    theirs = f.read_text().strip().split(":", 1)[1]
    salt = base64.b64decode(theirs.split("$")[3])
    assert password_hash("s3cret", salt=salt) == theirs


def test_snippets_load_into_the_agent_and_aggregator_configs(pki):
    from edge_agent.signing import Signer, Verifier

    agent = tomllib.loads(pki.client(A, "toml").read_text())
    cfg = from_dict(AgentConfig, {**agent, "data": "local.npz"})
    assert cfg.agent_id == cfg.broker.username == A and cfg.federation == FED
    assert cfg.broker.tls and cfg.broker.secret() == password(pki, A)
    agg = from_dict(AggregatorConfig, tomllib.loads(pki.client(AGGREGATOR_USER, "toml").read_text()))
    assert agg.broker.username == AGGREGATOR_USER and agg.broker.secret() == password(pki, AGGREGATOR_USER)
    # the signing pair: the agents pin the public half of the aggregator's key
    signer = Signer(agg.security.signing_key)
    assert [signer.public_key] == cfg.security.trusted_keys == [pki.signing_pub.read_text().strip()]
    props = dict(signer.properties(f"fl/{FED}/model", b"model bytes"))
    Verifier(cfg.security.trusted_keys).verify(f"fl/{FED}/model", b"model bytes", props)


def test_init_refuses_an_existing_ca_and_add_agent_touches_only_the_new_agent(tmp_path, capsys):
    d = tmp_path / "pki"
    f = init(d, FED, ["pi-1"])
    with pytest.raises(ProvisionError, match="already holds a CA"):
        init(d, FED, ["pi-1"])
    assert provision_main(["init", "--dir", str(d), "--fed", FED]) == 2
    assert "already holds a CA" in capsys.readouterr().err
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    assert provision_main(["add-agent", "--dir", str(d), "--agent", "pi-2"]) == 0
    after = {p.name: p.read_bytes() for p in d.iterdir()}
    changed = sorted(n for n in after if before.get(n) != after[n])
    assert changed == ["acl", "agent-pi-2.crt", "agent-pi-2.key", "agent-pi-2.password", "agent-pi-2.toml",
                       "passwd", "provision.json"]
    assert after["acl"].decode() == acl_text(FED, ["pi-1", "pi-2"], [OBSERVER_USER])
    assert after["passwd"].startswith(before["passwd"])  # appended, nothing rewritten
    for bad, why in (("pi-2", "already provisioned"), ("aggregator", "user name"), ("a/b", "must match"),
                     ("+", "must match"), ("", "must match")):
        with pytest.raises(ProvisionError, match=why):
            add_agents(d, [bad])
    # --force starts over: a new CA, and the old agents' files are gone
    old_ca = f.ca_cert.read_bytes()
    init(d, FED, ["pi-9"], force=True)
    assert f.ca_cert.read_bytes() != old_ca
    assert not f.client("pi-1", "crt").exists() and not f.client("pi-2", "key").exists()
    assert [ln.split(":")[0] for ln in f.passwd.read_text().splitlines()] == [AGGREGATOR_USER, "pi-9", OBSERVER_USER]


def test_render_config_keeps_a_tls_listener_and_overrides_paths(tmp_path):
    template = PROD_CONF.read_text()
    out = render_config(template, 4242, tmp_path, {"cafile": "/x/ca.crt", "require_certificate": None,
                                                   "use_identity_as_username": "true", "new_option": "1"})
    lines = [ln for ln in out.splitlines() if ln and not ln.startswith("#")]
    assert lines.count("listener 4242 127.0.0.1") == 1
    listener = lines.index("listener 4242 127.0.0.1")
    # the listener's TLS options stay after it, in place, with the override applied
    assert lines[listener + 1] == "cafile /x/ca.crt"
    assert lines[listener + 2] == "certfile /etc/mosquitto/fedmqtt/broker.crt"
    assert not any(ln.startswith("require_certificate") for ln in lines)
    assert "use_identity_as_username true" in lines and "use_identity_as_username false" not in lines
    assert "new_option 1" in lines
    assert not any(ln.startswith(("pid_file", "log_dest file /var", "persistence_location /var")) for ln in lines)
    with pytest.raises(ValueError):
        render_config(template, 4242, tmp_path, {"listener": "1"})


def test_production_config_has_one_tls_listener_and_no_anonymous_access(pki):
    """Every file option the tests point at provisioned files is in the production config (a
    missing one would be appended by the tests and hide the hole), and nothing weakens it."""
    opts = [ln.split(None, 1) for ln in PROD_CONF.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    keys = [k for k, *_ in opts]
    conf = {k: (v[0].strip() if v else "") for k, *v in opts}
    assert keys.count("listener") == 1 and conf["listener"] == "8883"
    assert conf["allow_anonymous"] == "false" and conf["require_certificate"] == "true"
    assert conf["use_identity_as_username"] == "false" and conf["use_username_as_clientid"] == "true"
    assert conf["per_listener_settings"] == "false"
    for option, path in broker_files(pki.dir).items():
        assert conf[option] == f"/etc/mosquitto/fedmqtt/{path.name}", option
    for option in ("max_packet_size", "max_queued_bytes", "max_queued_messages", "max_inflight_messages",
                   "set_tcp_nodelay", "persistence", "persistence_location", "log_dest"):
        assert option in conf, option
    assert not {"bridge", "connection", "psk_file", "auth_plugin", "plugin"} & set(keys)


# -- (a) the legitimate path ----------------------------------------------------------------


def test_one_round_over_tls_with_the_provisioned_credentials(pki, secure_broker, tmp_path, start_aggregator):
    from aggregator.datasets import federated_digits

    cfg = AggregatorConfig(
        federation=FED, rounds=1, state_dir=str(tmp_path / "state"),
        model=ModelConfig(kind="softmax", n_features=64, n_outputs=10),
        training=TrainingConfig(epochs=1, batch_size=16, lr=0.1),
        round=RoundConfig(min_agents=2, quorum=2, timeout=WAIT_S),
        broker=snippet_broker(pki, AGGREGATOR_USER, secure_broker),
    )
    ra = start_aggregator(cfg)
    data = federated_digits(2, "iid", 0.5, 0)
    loop = Loop()
    done: set[str] = set()
    all_done = threading.Event()

    def on_done(runner) -> None:
        done.add(runner.core.agent_id)
        if len(done) == 2:
            all_done.set()

    runners = [
        AgentRunner(loop, AgentCore(agent_id=aid, fed=FED, data=d, seed=i),
                    snippet_broker(pki, aid, secure_broker), on_done=on_done)
        for i, (aid, d) in enumerate(zip((A, B), data.agents))
    ]
    for r in runners:
        r.start()
    loop.start(name="secure-agents")
    try:
        ra.wait_finished()
        assert all_done.wait(WAIT_S), "agents did not see the federation finish"
    finally:
        loop.stop()
        loop.thread.join(10)
    summary = ra.rounds.get_nowait().summary
    assert summary.participants == 2
    assert not ra.coordinator.rejected
    assert all(r.core.updates_sent == 1 for r in runners)


def test_a_provisioned_agent_connects_by_dns_name_and_ip(pki, probe):
    assert probe(**creds(pki, A), host="localhost").outcome() == "connected"
    assert probe(**creds(pki, B), host="127.0.0.1").outcome() == "connected"


# -- (b) wrong credentials --------------------------------------------------------------------


@pytest.mark.parametrize("case", ["wrong password", "another agent's password", "unknown user", "no password"])
def test_wrong_credentials_are_refused_at_connack(pki, probe, case):
    c = creds(pki, A)
    if case == "wrong password":
        c["password"] = "not-the-password"
    elif case == "another agent's password":
        c["password"] = password(pki, B)
    elif case == "unknown user":
        c["user"] = "mallory"
    else:
        c["password"] = None
    outcome = probe(**c).outcome()
    assert outcome.startswith("refused:"), outcome
    assert "Not authorized" in outcome or "Bad user name or password" in outcome


# -- (c) the ACL ---------------------------------------------------------------------------------


def test_an_agent_cannot_publish_outside_its_own_topics(pki, probe):
    receiver = connected(probe(**creds(pki, AGGREGATOR_USER)))
    receiver.subscribe("#")  # everything the aggregator may read
    attacker = connected(probe(**creds(pki, A)))
    forbidden = [
        f"fl/{FED}/update/{B}",               # another agent's update
        f"fl/{FED}/model",                     # the global model
        f"fl/{FED}/model/onnx",
        f"fl/{FED}/task",                      # round control
        f"fl/{FED}/metrics",
        f"fl/{FED}/metrics/json",
        f"fl/{FED}/keys",                      # signing-key announcements
        f"fl/{FED}/agent/{B}/status",          # another agent's status
        f"fl/{FED}/agent/{A}/inbox",           # its own inbox is read-only
        f"fl/{FED}/agent/{B}/inbox",
        f"fl/{FED}/agent/{A}/selected",        # selecting itself
        f"fl/{FED}/agent/{B}/selected",
        f"fl/{FED}/update/{A}/more",           # below its own topic
        f"fl/{FED}/update/{AGGREGATOR_USER}",  # no agent is called "aggregator"
        f"fl/{FED}/update/{OBSERVER_USER}",    # nor "observer"
        f"fl/other/update/{A}",                # another federation
        f"fl/{FED}",
        "$SYS/broker/uptime",
        "anything",
    ]
    codes = {t: attacker.publish(t, f"attack {t}".encode()) for t in forbidden}
    codes[f"fl/{FED}/model (retained)"] = attacker.publish(f"fl/{FED}/model", b"attack retained", retain=True)
    attacker.publish(f"fl/{FED}/agent/{A}/status", b"control status", retain=True)
    ok = attacker.publish(f"fl/{FED}/update/{A}", b"control update")
    got = receiver.received(until=b"control update")
    assert got == [(f"fl/{FED}/agent/{A}/status", b"control status"), (f"fl/{FED}/update/{A}", b"control update")]
    # mosquitto 2.0 answers a v5 client's denied QoS 1 publish with PUBACK "Not authorized"
    # (the only evidence for the topics outside fl/<fed>/, which the aggregator cannot read)
    assert not ok.is_failure
    assert {t: str(rc) for t, rc in codes.items()} == {t: "Not authorized" for t in codes}
    # nothing of the attacker's was retained on the model topic: a new subscriber
    # gets the control first
    fresh = connected(probe(**creds(pki, B)))
    fresh.subscribe(f"fl/{FED}/model")
    receiver.publish(f"fl/{FED}/model", b"control model")
    assert fresh.received(until=b"control model") == [(f"fl/{FED}/model", b"control model")]
    attacker.publish(f"fl/{FED}/agent/{A}/status", b"", retain=True)  # clear the retained status


def test_an_agent_cannot_read_other_agents_updates_inboxes_or_selection(pki, probe):
    snoop = connected(probe(**creds(pki, A)))
    snoop.subscribe("#", f"fl/{FED}/#", f"fl/{FED}/update/+", f"fl/{FED}/agent/+/status",
                    f"fl/{FED}/agent/{B}/inbox", f"fl/{FED}/agent/+/selected", f"fl/{FED}/agent/{B}/selected",
                    "$SYS/#", f"$share/g/fl/{FED}/update/+", "$share/g/#")
    victim = connected(probe(**creds(pki, B)))
    aggregator = connected(probe(**creds(pki, AGGREGATOR_USER)))
    victim.publish(f"fl/{FED}/update/{B}", b"secret update")
    victim.publish(f"fl/{FED}/agent/{B}/status", b"secret status")
    aggregator.publish(f"fl/{FED}/agent/{B}/inbox", b"secret inbox")
    aggregator.publish(f"fl/{FED}/agent/{A}/inbox", b"control inbox")
    # who else is selected stays the aggregator's (and the accountant's) secret
    aggregator.publish(f"fl/{FED}/agent/{B}/selected", b"secret selection")
    aggregator.publish(f"fl/{FED}/agent/{A}/selected", b"control selection")
    aggregator.publish(f"fl/{FED}/model", b"control model")
    # (overlapping subscriptions may deliver a message once per match: compare sets)
    got = set(snoop.received(until=b"control model"))
    assert got == {(f"fl/{FED}/agent/{A}/inbox", b"control inbox"), (f"fl/{FED}/agent/{A}/selected", b"control selection"),
                   (f"fl/{FED}/model", b"control model")}


def test_an_agent_receives_the_aggregators_key_announcements(pki, probe):
    """Key rollover needs agents to read fl/<fed>/keys (and only the aggregator to write it)."""
    agent = connected(probe(**creds(pki, A)))
    agent.subscribe(f"fl/{FED}/keys")
    aggregator = connected(probe(**creds(pki, AGGREGATOR_USER)))
    aggregator.publish(f"fl/{FED}/keys", b"announcement")
    assert agent.received(until=b"announcement") == [(f"fl/{FED}/keys", b"announcement")]


def test_an_agent_reads_the_json_metrics_and_cannot_write_them(pki, probe):
    """fl/<fed>/metrics/json, the readable copy of metrics: readable by agents, written only by the aggregator."""
    agent = connected(probe(**creds(pki, A)))
    agent.subscribe(f"fl/{FED}/metrics/json")
    assert str(agent.publish(f"fl/{FED}/metrics/json", b"forged")) == "Not authorized"
    aggregator = connected(probe(**creds(pki, AGGREGATOR_USER)))
    aggregator.publish(f"fl/{FED}/metrics/json", b'{"round": 1}')
    assert agent.received(until=b'{"round": 1}') == [(f"fl/{FED}/metrics/json", b'{"round": 1}')]


def test_a_last_will_on_a_forbidden_topic_is_never_delivered(pki, probe):
    receiver = connected(probe(**creds(pki, AGGREGATOR_USER)))
    receiver.subscribe(f"fl/{FED}/#")
    for topic, payload in ((f"fl/{FED}/model", b"will model"), (f"fl/{FED}/task", b"will task"),
                           (f"fl/{FED}/agent/{A}/status", b"will control")):
        dying = connected(probe(**creds(pki, A), will=(topic, payload)))
        dying.client.socket().shutdown(socket.SHUT_RDWR)  # vanish without DISCONNECT: the will goes out
        if payload == b"will control":
            break
        time.sleep(0.2)  # let the broker notice before the same user connects again
    assert receiver.received(until=b"will control") == [(f"fl/{FED}/agent/{A}/status", b"will control")]


def test_an_agent_cannot_take_over_the_aggregators_client_id(pki, probe):
    """use_username_as_clientid: the broker replaces the client id by the user name."""
    aggregator = connected(probe(**creds(pki, AGGREGATOR_USER), client_id=f"fedmqtt-aggregator-{FED}"))
    aggregator.subscribe(f"fl/{FED}/update/+")
    intruder = connected(probe(**creds(pki, A), client_id=f"fedmqtt-aggregator-{FED}"))
    intruder.publish(f"fl/{FED}/update/{A}", b"control")
    assert aggregator.received(until=b"control") == [(f"fl/{FED}/update/{A}", b"control")]
    assert aggregator.disconnected is None and intruder.disconnected is None


# -- (d) certificates --------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["certificate from another CA", "no client certificate"])
def test_a_client_without_a_certificate_of_our_ca_fails_the_handshake(pki, rogue, probe, case):
    c = creds(pki, A)  # the right user name and password...
    if case == "certificate from another CA":
        c.update(cert=rogue.client(A, "crt"), key=rogue.client(A, "key"))
    else:
        c.update(cert=None, key=None)
    p = probe(**c)
    outcome = p.outcome()
    # TLS 1.3: the client finishes its half of the handshake, then the broker
    # rejects the certificate and closes the connection before any CONNACK
    assert outcome in ("dropped", "no answer") or outcome.startswith("tls error"), outcome
    assert p.connack is None


def test_a_client_refuses_a_broker_it_does_not_trust(pki, rogue, probe):
    """The client side: our CA does not vouch for another CA's broker, and vice versa."""
    outcome = probe(**{**creds(pki, A), "ca": rogue.ca_cert}).outcome()
    assert outcome.startswith("tls error: SSLCertVerificationError"), outcome


@pytest.mark.parametrize("impostor", ["another CA's broker", "an agent's certificate of our CA"])
def test_an_impostor_broker_is_refused(pki, rogue, probe, impostor):
    """A man in the middle with a certificate from another CA, or with a device's own
    (client-only, no SAN) certificate from our CA, cannot pose as the broker."""
    files = broker_files(pki.dir)
    if impostor == "another CA's broker":
        files.update(certfile=rogue.broker_cert, keyfile=rogue.broker_key)
    else:
        files.update(certfile=pki.client(B, "crt"), keyfile=pki.client(B, "key"))
    fake = start_broker(files)
    try:
        outcome = probe(fake, **creds(pki, A)).outcome()
    finally:
        fake.close()
    assert outcome.startswith("tls error: SSLCertVerificationError"), outcome


# -- (e) plain TCP and anonymous ---------------------------------------------------------------


def test_plain_tcp_is_refused(pki, probe):
    c = creds(pki, A)
    outcome = probe(user=c["user"], password=c["password"], tls=False).outcome()
    assert outcome in ("dropped", "no answer"), outcome


@pytest.mark.parametrize("layer", ["production config", "allow_anonymous false alone"])
def test_anonymous_is_refused_even_with_a_valid_certificate(pki, probe, layer):
    """Two settings refuse a client without a user name: allow_anonymous false, and
    use_username_as_clientid (no user name, no client id); each is enough alone."""
    broker = None
    if layer != "production config":
        broker = start_broker(broker_files(pki.dir), use_username_as_clientid="false")
    try:
        c = creds(pki, A)
        outcome = probe(broker, ca=c["ca"], cert=c["cert"], key=c["key"]).outcome()
    finally:
        if broker is not None:
            broker.close()
    assert outcome.startswith("refused:"), outcome


# -- operations ----------------------------------------------------------------------------------


def test_an_added_agent_can_connect_once_the_broker_reloads(tmp_path, probe):
    f = init(tmp_path / "pki", FED, [A])
    broker = start_broker(broker_files(f.dir))
    try:
        assert provision_main(["add-agent", "--dir", str(f.dir), "--agent", "pi-new"]) == 0
        assert probe(broker, **creds(f, "pi-new")).outcome().startswith("refused:")  # not reloaded yet
        broker.proc.send_signal(signal.SIGHUP)  # what `systemctl reload mosquitto` does
        end = time.monotonic() + WAIT_S
        while (newcomer := probe(broker, **creds(f, "pi-new"))).outcome() != "connected":
            assert time.monotonic() < end, "the reloaded broker still refuses the new agent"
            newcomer.close()
            time.sleep(0.05)
        receiver = connected(probe(broker, **creds(f, AGGREGATOR_USER)))
        receiver.subscribe(f"fl/{FED}/update/+")
        assert newcomer.publish(f"fl/{FED}/update/{A}", b"x").is_failure  # the reloaded ACL has its block
        newcomer.publish(f"fl/{FED}/update/pi-new", b"control")
        assert receiver.received(until=b"control") == [(f"fl/{FED}/update/pi-new", b"control")]
    finally:
        broker.close()


def test_identity_as_username_ties_the_certificate_to_the_user(pki, probe):
    """The README's alternative: use_identity_as_username true, user name = certificate CN."""
    broker = start_broker(broker_files(pki.dir), use_identity_as_username="true")
    try:
        receiver = connected(probe(broker, **creds(pki, AGGREGATOR_USER)))
        receiver.subscribe(f"fl/{FED}/update/+")
        c = creds(pki, A)
        # A's certificate with B's user name and password: the broker uses the CN, A
        impostor = connected(probe(broker, **{**c, "user": B, "password": password(pki, B)}))
        assert impostor.publish(f"fl/{FED}/update/{B}", b"as B").is_failure
        impostor.publish(f"fl/{FED}/update/{A}", b"control")
        assert receiver.received(until=b"control") == [(f"fl/{FED}/update/{A}", b"control")]
        # the certificate alone logs in (no user name, no password), as its CN
        certified = connected(probe(broker, ca=c["ca"], cert=c["cert"], key=c["key"]))
        certified.publish(f"fl/{FED}/update/{A}", b"control 2")
        assert receiver.received(until=b"control 2") == [(f"fl/{FED}/update/{A}", b"control 2")]
    finally:
        broker.close()


def test_private_files_stay_private_after_add_agent(tmp_path):
    f = init(tmp_path / "pki", FED, [])
    add_agents(f.dir, ["pi-1"])
    for p in (f.passwd, f.client("pi-1", "key"), f.client("pi-1", "password")):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert stat.S_IMODE(f.dir.stat().st_mode) & 0o077 == 0


def test_a_revoked_agent_is_disconnected_and_refused_after_a_reload(tmp_path, probe):
    """The README's revocation: mosquitto_passwd -D, then reload. The certificate stays valid,
    but with use_identity_as_username false the password is needed too."""
    import shutil
    import subprocess

    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd not installed")
    f = init(tmp_path / "pki", FED, [A, B])
    broker = start_broker(broker_files(f.dir))
    try:
        revoked = connected(probe(broker, **creds(f, A)))
        other = connected(probe(broker, **creds(f, B)))
        subprocess.run([tool, "-D", str(f.passwd), A], check=True, capture_output=True)
        broker.proc.send_signal(signal.SIGHUP)
        end = time.monotonic() + WAIT_S
        while revoked.disconnected is None:
            assert time.monotonic() < end, "the revoked agent is still connected"
            time.sleep(0.02)
        assert probe(broker, **creds(f, A)).outcome().startswith("refused:")
        assert other.disconnected is None and probe(broker, **creds(f, B)).outcome() == "connected"
    finally:
        broker.close()
