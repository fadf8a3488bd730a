"""The read-only observer login, the generated ACL, and the aggregator's open-broker probe.

Over the production broker config (deploy/mosquitto/mosquitto.conf) with
freshly provisioned files, as in tests/test_security_broker.py: the
observer reads what a real run retains, ``fedmqtt status`` with its flags
works while the aggregator keeps running, and every publish it tries is
refused and never reaches the aggregator. The probe tests run the
aggregator against the repo's open test broker and against the TLS broker.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import signal
import time

import pytest

from aggregator.broker_probe import BrokerProbe, probe_anonymous_publish
from aggregator.cli import main as cli_main
from aggregator.config import AggregatorConfig, ModelConfig, RoundConfig, SecurityConfig, TrainingConfig
from aggregator.provision import (
    AGGREGATOR_USER,
    OBSERVER_USER,
    Files,
    add_observers,
    broker_files,
    init,
    provision_main,
    status_flags,
)
from edge_agent import wire
from edge_agent.agent import AgentCore, AgentRunner
from edge_agent.mqtt import Loop

from .conftest import WAIT_S
from .test_security_broker import Probe, connected, creds, snippet_broker, start_broker

pytestmark = pytest.mark.broker

FED = "obs"
A, B = "agent-000", "agent-001"
ACL_WARNING = "does not contain '%c' or '%u'"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Files:
    d = tmp_path_factory.mktemp("pki")
    assert provision_main(["init", "--dir", str(d), "--fed", FED, "--agents", "2"]) == 0
    return Files(d)


@pytest.fixture
def secure_broker(pki):
    b = start_broker(broker_files(pki.dir))
    yield b
    b.close()


def observer_creds(f: Files, name: str = OBSERVER_USER) -> dict:
    return dict(user=name, password=f.observer(name, "password").read_text().strip(), ca=f.ca_cert,
                cert=f.observer(name, "crt"), key=f.observer(name, "key"))


def snippet_command(f: Files, name: str = OBSERVER_USER) -> list[str]:
    """The ``fedmqtt status ...`` command line written (as a comment) into the observer's .toml."""
    text = f.observer(name, "toml").read_text()
    lines = [ln[1:].strip() for ln in text.splitlines() if ln.startswith("#   ") or ln.startswith("#       ")]
    return shlex.split(" ".join(ln.rstrip("\\") for ln in lines))


def wait_until(cond, what: str, timeout: float = WAIT_S) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, what
        time.sleep(0.02)


# -- provisioning: files, the snippet, the ACL ------------------------------------------------------


def test_file_names_are_not_doubled(pki, tmp_path):
    names = sorted(p.name for p in pki.dir.iterdir())
    assert not [n for n in names if "agent-agent" in n or "observer-observer" in n], names
    for stem in (A, B, OBSERVER_USER, AGGREGATOR_USER):
        for suffix in ("crt", "key", "password", "toml"):
            assert f"{stem}.{suffix}" in names
    assert pki.client(A, "crt").name == "agent-000.crt"
    # an id without the prefix still gets it; so does an observer's name
    f = init(tmp_path / "pki", FED, ["pi-1"], observers=[])
    add_observers(f.dir, ["dashboard"])
    names = sorted(p.name for p in f.dir.iterdir())
    assert "agent-pi-1.crt" in names and "observer-dashboard.toml" in names and "observer.crt" not in names
    # two ids that would share files, and an observer named like an agent, are refused
    assert provision_main(["add-agent", "--dir", str(f.dir), "--agent", "agent-pi-1"]) == 2
    assert provision_main(["add-observer", "--dir", str(f.dir), "--observer", "pi-1"]) == 2
    assert provision_main(["add-observer", "--dir", str(f.dir), "--observer", "observer-dashboard"]) == 2


def test_the_observer_snippet_matches_its_files(pki):
    import tomllib

    from edge_agent.config import BrokerConfig, from_dict

    data = tomllib.loads(pki.observer(OBSERVER_USER, "toml").read_text())
    b = from_dict(BrokerConfig, data["broker"], "broker")
    assert data["federation"] == FED
    assert b.username == OBSERVER_USER and b.tls and b.secret() == observer_creds(pki)["password"]
    assert (b.ca_file, b.cert_file, b.key_file) == (str(pki.ca_cert), str(pki.observer(OBSERVER_USER, "crt")),
                                                   str(pki.observer(OBSERVER_USER, "key")))
    m = json.loads(pki.manifest.read_text())
    assert snippet_command(pki) == ["fedmqtt", *status_flags(m, pki, OBSERVER_USER)]


def test_the_provisioned_broker_starts_and_reloads_without_acl_warnings(pki, tmp_path):
    b = start_broker(broker_files(pki.dir))
    try:
        # mosquitto installs its SIGHUP handler after opening the listener (a SIGHUP
        # before that kills it); "running" is logged after both
        wait_until(lambda: " running" in b.log_path.read_text(), "the broker never logged that it runs")
        b.proc.send_signal(signal.SIGHUP)  # `systemctl reload mosquitto` re-reads the ACL
        wait_until(lambda: "Reloading config" in b.log_path.read_text(), "the broker did not log the reload")
        log = b.log_path.read_text()
    finally:
        b.close()
    assert "mosquitto version 2" in log and "running" in log  # the log we mean
    assert ACL_WARNING not in log, log
    assert "Warning" not in log, log
    # positive control: the ACL earlier versions wrote does produce the warning in this log
    old = tmp_path / "old-acl"
    old.write_text(f"pattern write fl/{FED}/update/%u\npattern read fl/{FED}/model\n"
                   f"user {AGGREGATOR_USER}\ntopic readwrite fl/{FED}/#\n")
    b = start_broker({**broker_files(pki.dir), "acl_file": old})
    try:
        time.sleep(0.1)
        log = b.log_path.read_text()
    finally:
        b.close()
    assert f"ACL pattern 'fl/{FED}/model' {ACL_WARNING}" in log, log


# -- the observer on the TLS broker ----------------------------------------------------------------


def test_the_observer_reads_only_and_publishes_nowhere(pki, secure_broker):
    """Its ACL block: the retained topics and the statuses, nothing of updates or inboxes, no writes."""
    made: list[Probe] = []

    def probe(**kw) -> Probe:
        made.append(p := Probe(secure_broker, **kw))
        return p

    try:
        receiver = connected(probe(**creds(pki, AGGREGATOR_USER)))
        receiver.subscribe(f"fl/{FED}/#")
        observer = connected(probe(**observer_creds(pki)))
        observer.subscribe("#", f"fl/{FED}/#", f"fl/{FED}/update/+", f"fl/{FED}/agent/+/inbox",
                           f"fl/{FED}/agent/+/selected", f"$share/g/fl/{FED}/update/+")
        agent = connected(probe(**creds(pki, A)))
        agent.publish(f"fl/{FED}/update/{A}", b"secret update")
        receiver.publish(f"fl/{FED}/agent/{A}/inbox", b"secret inbox")
        receiver.publish(f"fl/{FED}/agent/{A}/selected", b"secret selection")
        for t in ("model", "model/onnx", "task", "metrics", "metrics/json", "keys"):
            receiver.publish(f"fl/{FED}/{t}", f"control {t}".encode())
        agent.publish(f"fl/{FED}/agent/{A}/status", b"control status")
        got = set(observer.received(until=b"control status"))
        assert got == {*((f"fl/{FED}/{t}", f"control {t}".encode())
                         for t in ("model", "model/onnx", "task", "metrics", "metrics/json", "keys")),
                       (f"fl/{FED}/agent/{A}/status", b"control status")}
        forbidden = [f"fl/{FED}/update/{A}", f"fl/{FED}/update/{OBSERVER_USER}", f"fl/{FED}/model",
                     f"fl/{FED}/model/onnx", f"fl/{FED}/task", f"fl/{FED}/metrics", f"fl/{FED}/metrics/json",
                     f"fl/{FED}/keys", f"fl/{FED}/agent/{A}/status", f"fl/{FED}/agent/{OBSERVER_USER}/status",
                     f"fl/{FED}/agent/{A}/inbox", f"fl/{FED}/agent/{OBSERVER_USER}/inbox",
                     f"fl/{FED}/agent/{A}/selected", "anything"]
        codes = {t: str(observer.publish(t, b"forged")) for t in forbidden}
        codes["model (retained)"] = str(observer.publish(f"fl/{FED}/model", b"forged", retain=True))
        assert codes == {t: "Not authorized" for t in codes}
        agent.publish(f"fl/{FED}/update/{A}", b"control update")
        got = receiver.received(until=b"control update")
        assert b"forged" not in {p for _, p in got}
    finally:
        for p in made:
            p.close()


def test_status_with_the_observer_flags_while_the_aggregator_keeps_running(pki, secure_broker, tmp_path,
                                                                            start_aggregator, capsys):
    """A real run over TLS: the observer reads the retained model, task, metrics and statuses,
    `fedmqtt status` with the snippet's flags prints them, the aggregator's connection is not
    taken over (it keeps closing rounds), and nothing the observer publishes reaches it."""
    from aggregator.datasets import federated_digits

    cfg = AggregatorConfig(
        federation=FED, rounds=0, state_dir=str(tmp_path / "state"),
        model=ModelConfig(kind="softmax", n_features=64, n_outputs=10),
        training=TrainingConfig(epochs=1, batch_size=16, lr=0.1),
        round=RoundConfig(min_agents=2, quorum=2, timeout=WAIT_S),
        broker=snippet_broker(pki, AGGREGATOR_USER, secure_broker),
    )
    ra = start_aggregator(cfg)
    seen: list[tuple[str, bytes]] = []
    handle = ra.service.on_message

    def recording(conn, topic, payload, props):  # everything the aggregator's connection delivers
        seen.append((topic, payload))
        handle(conn, topic, payload, props)

    ra.service.on_message = recording
    data = federated_digits(2, "iid", 0.5, 0)
    loop = Loop()
    # a second and a half of "training" per round: rounds keep coming, with quiet gaps for `status`
    runners = [AgentRunner(loop, AgentCore(agent_id=aid, fed=FED, data=d, seed=i),
                           snippet_broker(pki, aid, secure_broker), train_delay=1.5)
               for i, (aid, d) in enumerate(zip((A, B), data.agents))]
    for r in runners:
        r.start()
    loop.start(name="observed-agents")
    observer = None
    try:
        first = ra.rounds.get(timeout=WAIT_S).summary
        assert first.participants == 2
        # (1) a raw observer reads what the run retains
        observer = connected(Probe(secure_broker, **observer_creds(pki)))
        observer.subscribe(f"fl/{FED}/#")
        kinds: dict[str, object] = {}
        end = time.monotonic() + WAIT_S
        while not {"model", "task", "metrics", A, B} <= kinds.keys():
            assert time.monotonic() < end, f"the observer got only {sorted(kinds)}"
            topic, payload, retained = observer.messages.get(timeout=WAIT_S)
            kind = topic.removeprefix(f"fl/{FED}/")
            if kind in ("model", "task", "metrics"):
                kinds[kind] = wire.decode(payload, expect=kind, fed=FED)
            elif kind.startswith("agent/") and kind.endswith("/status") and payload:
                msg = wire.decode(payload, expect="status", fed=FED)
                kinds[msg.agent] = msg
            assert not kind.startswith(("update/", "agent/")) or kind.endswith("/status"), topic
        assert kinds["model"].round >= 1 and kinds["metrics"].round >= 1
        assert kinds[A].state == kinds[B].state == "online"
        # (2) every publish of the observer is refused...
        targets = [f"fl/{FED}/update/{A}", f"fl/{FED}/update/x", f"fl/{FED}/update/{OBSERVER_USER}",
                   f"fl/{FED}/model", f"fl/{FED}/task", f"fl/{FED}/agent/{B}/status",
                   f"fl/{FED}/agent/{OBSERVER_USER}/status", f"fl/{FED}/agent/{A}/inbox"]
        codes = {t: str(observer.publish(t, b"forged by the observer")) for t in targets}
        assert codes == {t: "Not authorized" for t in targets}
        observer.close()
        observer = None
        # (3) `fedmqtt status` with the flags of observer.toml, aimed at the test broker
        argv = snippet_command(pki)[2:]
        argv[argv.index("--broker-host") + 1] = secure_broker.host
        argv[argv.index("--broker-port") + 1] = str(secure_broker.port)
        capsys.readouterr()
        assert cli_main("status", argv) == 0
        out = capsys.readouterr().out
        assert f"federation {FED}" in out and "model    round" in out and "last rounds" in out, out
        assert A in out and B in out and "2 known, 2 online" in out, out
        # (4) the aggregator's connection survived: it keeps closing rounds
        after = ra.coordinator.round
        while (ev := ra.rounds.get(timeout=WAIT_S)).summary.round <= after:
            pass
        assert ev.summary.participants == 2
        assert ra.service.conn.connected and getattr(ra.service, "fatal", None) is None
    finally:
        if observer is not None:
            observer.close()
        loop.stop()
        loop.thread.join(10)
    # ...and never reached the aggregator, which rejected nothing
    assert not [t for t, p in seen if b"forged" in p]
    assert any(t == f"fl/{FED}/update/{A}" for t, _ in seen)  # control: the agents' updates did
    assert not ra.coordinator.rejected, dict(ra.coordinator.rejected)
    log = secure_broker.log_path.read_text()
    assert "as observer" in log  # the observer did log in...
    assert f"Client {AGGREGATOR_USER} already connected" not in log  # ...and took over no one


# -- the open-broker probe -------------------------------------------------------------------------


def _probe_config(fed: str, broker, state, probe: bool = True) -> AggregatorConfig:
    return AggregatorConfig(
        federation=fed, rounds=1, state_dir=str(state),
        model=ModelConfig(kind="softmax", n_features=4, n_outputs=2),
        round=RoundConfig(min_agents=1, quorum=1, timeout=WAIT_S),
        security=SecurityConfig(probe_open_broker=probe),
        broker=broker,
    )


def _probe_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "aggregator.broker_probe" and r.levelno == logging.WARNING]


def test_the_aggregator_warns_about_an_open_broker(broker_config, fed, tmp_path, start_aggregator, raw_client,
                                                   caplog):
    caplog.set_level(logging.INFO, logger="aggregator.broker_probe")
    watcher = raw_client()
    watcher.subscribe(f"fl/{fed}/update/+")
    started = time.monotonic()
    ra = start_aggregator(_probe_config(fed, broker_config, tmp_path / "state"))
    wait_until(lambda: ra.service.broker_probe is not None, "the aggregator did not start its probe")
    probe = ra.service.broker_probe
    assert probe.done.wait(WAIT_S)
    assert time.monotonic() - started < WAIT_S
    assert probe.result.open is True, probe.result
    (warning,) = _probe_warnings(caplog)
    assert f"lets anonymous clients publish to fl/{fed}/update/+" in warning and "probe_open_broker" in warning
    # the probe went out under update/ (empty, to an id no agent can have)...
    topic, payload, _ = watcher.messages.get(timeout=WAIT_S)
    assert topic.startswith(f"fl/{fed}/update/.probe-") and payload == b""
    # ...and the aggregator ignored it: a control status behind it is handled, nothing is rejected
    status = wire.StatusMsg(fed=fed, round=0, agent="ctl", state="offline", capabilities=["softmax"])
    watcher.publish(f"fl/{fed}/agent/ctl/status", wire.encode(status))
    wait_until(lambda: "ctl" in ra.coordinator.agents, "the control status never reached the aggregator")
    assert not ra.coordinator.rejected, dict(ra.coordinator.rejected)
    # the probe ran off the loop thread: the loop was free meanwhile
    assert probe.thread is not ra.loop.thread


def test_the_probe_can_be_turned_off(broker_config, fed, tmp_path, start_aggregator, caplog):
    caplog.set_level(logging.INFO, logger="aggregator.broker_probe")
    ra = start_aggregator(_probe_config(fed, broker_config, tmp_path / "state", probe=False))
    wait_until(lambda: ra.service.conn.connected, "the aggregator did not connect")
    time.sleep(0.2)
    assert ra.service.broker_probe is None and not _probe_warnings(caplog)


def test_no_warning_on_the_provisioned_broker(pki, secure_broker, tmp_path, start_aggregator, caplog):
    caplog.set_level(logging.DEBUG, logger="aggregator.broker_probe")
    cfg = _probe_config(FED, snippet_broker(pki, AGGREGATOR_USER, secure_broker), tmp_path / "state")
    ra = start_aggregator(cfg)
    wait_until(lambda: ra.service.broker_probe is not None, "the aggregator did not start its probe")
    assert ra.service.broker_probe.done.wait(WAIT_S)
    assert ra.service.broker_probe.result.open is False, ra.service.broker_probe.result
    assert "without a certificate" in ra.service.broker_probe.result.detail  # require_certificate
    assert not _probe_warnings(caplog)
    assert ra.service.conn.connected  # the probe's anonymous attempt cost the aggregator nothing


def test_the_probe_never_logs_in_with_the_aggregators_certificate(pki):
    """With use_identity_as_username the certificate alone logs a client in as its CN: a probe
    that presented the aggregator's would be the aggregator, and take over its connection."""
    b = start_broker(broker_files(pki.dir), use_identity_as_username="true")
    try:
        aggregator = connected(Probe(b, **creds(pki, AGGREGATOR_USER)))
        r = probe_anonymous_publish(snippet_broker(pki, AGGREGATOR_USER, b), FED)
        time.sleep(0.2)
        assert r.open is False, r
        assert aggregator.disconnected is None  # not taken over
        aggregator.close()
    finally:
        b.close()


def test_the_probe_reads_the_brokers_answer_at_the_mqtt_level(pki):
    """TLS without client certificates, so the probe gets to MQTT: the production settings refuse
    the anonymous CONNACK; with anonymous logins allowed the ACL refuses the publish (PUBACK "not
    authorized"); without the ACL the broker is open."""
    no_certs = dict(require_certificate="false")
    bc = snippet_broker(pki, AGGREGATOR_USER, b := start_broker(broker_files(pki.dir), **no_certs))
    try:
        r = probe_anonymous_publish(bc, FED)
        assert r.open is False and "anonymous connection refused" in r.detail, r
    finally:
        b.close()
    b = start_broker(broker_files(pki.dir), allow_anonymous="true", use_username_as_clientid="false", **no_certs)
    try:
        r = probe_anonymous_publish(dataclasses.replace(bc, port=b.port), FED)
        assert r.open is False and "Not authorized" in r.detail, r
        # and with no ACL at all, the same broker is open
        open_broker = start_broker(broker_files(pki.dir), acl_file=None, allow_anonymous="true",
                                   use_username_as_clientid="false", **no_certs)
        try:
            r = probe_anonymous_publish(dataclasses.replace(bc, port=open_broker.port), FED)
            assert r.open is True, r
        finally:
            open_broker.close()
    finally:
        b.close()


def test_the_probe_gives_up_quickly_on_a_broker_that_does_not_answer():
    import socket

    from edge_agent.config import BrokerConfig

    with socket.socket() as s:  # listens, never accepts: the TCP handshake completes, MQTT never answers
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        started = time.monotonic()
        probe = BrokerProbe(BrokerConfig(host="127.0.0.1", port=s.getsockname()[1]), FED, timeout=0.5).start()
        assert probe.done.wait(5)
    assert probe.result.open is None and time.monotonic() - started < 3
