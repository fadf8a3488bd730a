"""Ingest workers on the secured broker: ``fedmqtt provision init --workers N`` and its ACL.

The unit tests check what provisioning writes for workers (logins with one
password, an ACL block per worker as docs/PROTOCOL.md §10.1 shows, the
manifest, the ``[workers]`` section of aggregator.toml) and what it refuses.
The broker tests run the production config (deploy/mosquitto/mosquitto.conf)
with the provisioned files, as tests/test_security_broker.py does: a
federation with two in-process workers logged in as ``ingest-0`` and
``ingest-1`` and four real agents, and the ACL keeping devices out of
``fl/<fed>/ingest/`` and each worker out of the other's topics.
"""

from __future__ import annotations

import base64
import json
import re
import stat
import threading
import time
import tomllib
from pathlib import Path

import pytest

from aggregator.ingest import wire as iw
from aggregator.config import AggregatorConfig
from aggregator.ingest.worker import IngestWorker, worker_broker
from aggregator.provision import (
    AGGREGATOR_USER,
    OBSERVER_USER,
    WORKER_USER,
    Files,
    ProvisionError,
    acl_text,
    add_agents,
    add_observers,
    broker_files,
    init,
    password_hash,
    provision_main,
    worker_user,
)
from edge_agent import wire
from edge_agent.agent import AgentCore, AgentRunner
from edge_agent.config import from_dict, load
from edge_agent.mqtt import Loop

from .conftest import WAIT_S
from .test_security_broker import Probe, connected, creds, snippet_broker, start_broker

REPO = Path(__file__).resolve().parents[1]
FED = "ingsec"
AGENTS = [f"agent-{i:03d}" for i in range(5)]  # what `--agents 5` names them
RUNNING = AGENTS[:4]  # the devices that train; agent-004's login is the attacker's
ATTACKER = AGENTS[4]


def _rules(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln and not ln.startswith("#")]


def _worker_block(fed: str, i: int) -> list[str]:
    """docs/PROTOCOL.md §10.1's ACL block, with <fed> and <i> filled in."""
    doc = (REPO / "docs" / "PROTOCOL.md").read_text()
    m = re.search(r"```\n(user ingest-<i>\n.*?)```", doc, re.S)
    assert m, "docs/PROTOCOL.md §10.1 no longer shows the worker's ACL block"
    return m.group(1).replace("<fed>", fed).replace("<i>", str(i)).strip().splitlines()


def _verify(line: str, password: str) -> bool:
    """Whether a mosquitto ``$7$`` password-file line holds ``password`` (the module's own hash)."""
    _, h = line.split(":", 1)
    _, seven, iterations, salt, _digest = h.split("$")
    assert seven == "7"
    return password_hash(password, base64.b64decode(salt), int(iterations)) == h


def _passwd(f: Files) -> dict[str, str]:
    return {ln.split(":", 1)[0]: ln for ln in f.passwd.read_text().splitlines()}


# -- provisioning (no broker) -------------------------------------------------------------------


def test_init_with_workers_writes_their_logins_acl_blocks_and_manifest(tmp_path, capsys):
    d = tmp_path / "pki"
    assert provision_main(["init", "--dir", str(d), "--fed", FED, "--agents", "2", "--workers", "3"]) == 0
    assert "3 ingest worker login(s) (ingest-0 .. ingest-2)" in capsys.readouterr().out
    f = Files(d)
    # one password for every worker login, private
    assert stat.S_IMODE(f.ingest_password.stat().st_mode) == 0o600
    assert f.ingest_password.name == "ingest.password"
    pw = f.ingest_password.read_text().strip()
    assert len(pw) >= 32
    lines = _passwd(f)
    assert list(lines) == [AGGREGATOR_USER, "ingest-0", "ingest-1", "ingest-2", *AGENTS[:2], OBSERVER_USER]
    for i in range(3):
        assert _verify(lines[worker_user(i)], pw), worker_user(i)
        assert not _verify(lines[worker_user(i)], pw + "x")
    assert len({lines[worker_user(i)].split("$")[3] for i in range(3)}) == 3, "each line has its own salt"
    assert not _verify(lines[AGGREGATOR_USER], pw), "the workers' password is not the aggregator's"
    # the manifest remembers the count, the ACL has a block per worker
    m = json.loads(f.manifest.read_text())
    assert m["workers"] == 3
    assert f.acl.read_text() == acl_text(FED, AGENTS[:2], [OBSERVER_USER], 3)
    rules = _rules(f.acl.read_text())
    assert rules[:2] == [f"user {AGGREGATOR_USER}", f"topic readwrite fl/{FED}/#"]
    assert rules[2:2 + 18] == [ln for i in range(3) for ln in _worker_block(FED, i)]
    # no other login may use fl/<fed>/ingest/, and no pattern lines
    user = None
    for ln in rules:
        if ln.startswith("user "):
            user = ln.split()[1]
        elif "/ingest/" in ln:
            assert user is not None and user.startswith(f"{WORKER_USER}-"), (user, ln)
            assert f"/ingest/{user.split('-')[1]}/" in ln, (user, ln)
    assert not [ln for ln in rules if ln.startswith("pattern")]
    # the ACL keeps its header and says what the worker blocks are
    text = f.acl.read_text()
    assert text.startswith(f"# fedmqtt ACL for federation {FED!r}")
    assert "# Ingest worker 0 ([workers] username = \"ingest\"; docs/PROTOCOL.md §10.1)" in text


def test_without_workers_nothing_changes():
    assert acl_text(FED, ["a"], [OBSERVER_USER]) == acl_text(FED, ["a"], [OBSERVER_USER], 0)
    assert "ingest" not in acl_text(FED, ["a"], [OBSERVER_USER])


def test_the_acl_block_is_the_one_the_docs_show():
    """docs/PROTOCOL.md §10.1 and deploy/scale.md "Ingest workers" show the same block provisioning writes."""
    rules = _rules(acl_text(FED, [], [], 1))
    assert rules[2:] == _worker_block(FED, 0)
    scale = (REPO / "deploy" / "scale.md").read_text()
    section = scale[scale.index("## Ingest workers"):scale.index("## Broker tier")]
    assert "fedmqtt provision init ... --workers N" in section
    m = re.search(r"```\n(user ingest-0\n.*?)```", section, re.S)
    assert m and m.group(1).replace("<fed>", FED).strip().splitlines() == _worker_block(FED, 0)


def test_add_agent_and_add_observer_keep_the_worker_blocks_and_logins(tmp_path):
    f = init(tmp_path / "pki", FED, ["pi-1"], workers=2)
    before = _passwd(f)
    add_agents(f.dir, ["pi-2"])
    add_observers(f.dir, ["dashboard"])
    assert f.acl.read_text() == acl_text(FED, ["pi-1", "pi-2"], [OBSERVER_USER, "dashboard"], 2)
    after = _passwd(f)
    for i in range(2):
        assert after[worker_user(i)] == before[worker_user(i)]
    assert json.loads(f.manifest.read_text())["workers"] == 2


def test_names_of_worker_logins_are_refused_for_agents_and_observers(tmp_path, capsys):
    taken = "is already the user name of an ingest worker; pick another"
    with pytest.raises(ProvisionError, match=f"'ingest-1' {taken} agent id"):
        init(tmp_path / "a", FED, ["pi-1", "ingest-1"], workers=2)
    with pytest.raises(ProvisionError, match=f"'ingest-0' {taken} observer name"):
        init(tmp_path / "b", FED, [], observers=["ingest-0"], workers=1)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists(), "refused before writing anything"
    f = init(tmp_path / "pki", FED, ["pi-1"], workers=2)
    acl = f.acl.read_text()
    with pytest.raises(ProvisionError, match="user name of an ingest worker"):
        add_agents(f.dir, ["ingest-0"])
    with pytest.raises(ProvisionError, match="user name of an ingest worker"):
        add_observers(f.dir, ["ingest-1"], force=True)
    assert provision_main(["add-agent", "--dir", str(f.dir), "--agent", "ingest-1"]) == 2
    assert "user name of an ingest worker" in capsys.readouterr().err
    assert f.acl.read_text() == acl
    # only the provisioned workers' names are taken
    add_agents(f.dir, ["ingest-2"])
    init(tmp_path / "none", FED, ["ingest-0"])
    for bad in ("65", "-1"):
        assert provision_main(["init", "--dir", str(tmp_path / "c"), "--fed", FED, "--workers", bad]) == 2
        assert "--workers must be in 0..64" in capsys.readouterr().err


def test_the_aggregator_snippet_configures_the_workers(tmp_path):
    f = init(tmp_path / "pki", FED, [], workers=2)
    text = f.client(AGGREGATOR_USER, "toml").read_text()
    assert "ingest.password" in text.split("\n\n", 1)[0], "the header says to copy the workers' password"
    cfg = load(AggregatorConfig, f.client(AGGREGATOR_USER, "toml"))
    w = cfg.workers
    assert (w.count, w.username, w.password_file) == (2, "ingest", str(f.ingest_password))
    assert w.spawn, "the default: the aggregator starts its workers"
    for i in range(2):
        b = worker_broker(cfg, i)
        assert b.username == worker_user(i) and b.secret() == f.ingest_password.read_text().strip()
        # the aggregator's certificate: TLS authentication only (use_identity_as_username false)
        assert (b.tls, b.ca_file, b.cert_file, b.key_file) == (
            True, str(f.ca_cert), str(f.client(AGGREGATOR_USER, "crt")), str(f.client(AGGREGATOR_USER, "key")))
    assert cfg.broker.username == AGGREGATOR_USER
    # where the files will live on the aggregator host
    g = init(tmp_path / "pki2", FED, [], workers=1, aggregator_dir="/etc/fedmqtt")
    data = tomllib.loads(g.client(AGGREGATOR_USER, "toml").read_text())
    assert data["workers"] == {"count": 1, "username": "ingest", "password_file": "/etc/fedmqtt/ingest.password"}
    # without workers: no [workers] section, no ingest.password
    h = init(tmp_path / "pki3", FED, [])
    assert "[workers]" not in h.client(AGGREGATOR_USER, "toml").read_text()
    assert load(AggregatorConfig, h.client(AGGREGATOR_USER, "toml")).workers.count == 0
    assert not h.ingest_password.exists() and "workers" in json.loads(h.manifest.read_text())


def test_init_force_replaces_the_worker_logins(tmp_path):
    f = init(tmp_path / "pki", FED, ["pi-1"], workers=2)
    old = f.ingest_password.read_text()
    init(f.dir, FED, ["pi-1"], workers=1, force=True)
    assert f.ingest_password.read_text() != old
    assert [u for u in _passwd(f) if u.startswith("ingest-")] == ["ingest-0"]
    init(f.dir, FED, ["pi-1"], force=True)
    assert not f.ingest_password.exists() and not [u for u in _passwd(f) if u.startswith("ingest-")]
    assert "ingest" not in f.acl.read_text()


# -- on the production broker --------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Files:
    """A federation of five agents and two ingest workers, provisioned through the command line."""
    d = tmp_path_factory.mktemp("pki")
    assert provision_main(["init", "--dir", str(d), "--fed", FED, "--agents", "5", "--workers", "2"]) == 0
    return Files(d)


@pytest.fixture
def secure_broker(pki):
    b = start_broker(broker_files(pki.dir))
    yield b
    b.close()


@pytest.fixture
def probe(secure_broker):
    made: list[Probe] = []

    def make(**kw) -> Probe:
        p = Probe(secure_broker, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def worker_creds(f: Files, i: int) -> dict:
    """Worker ``i``'s login: ingest-<i>, the workers' password, the aggregator's certificate."""
    return dict(user=worker_user(i), password=f.ingest_password.read_text().strip(), ca=f.ca_cert,
                cert=f.client(AGGREGATOR_USER, "crt"), key=f.client(AGGREGATOR_USER, "key"))


def _wait(cond, what: str, timeout: float = WAIT_S) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.broker
def test_two_provisioned_workers_run_a_federation_over_tls(pki, secure_broker, tmp_path, start_aggregator, probe):
    from aggregator.datasets import federated_digits

    # The provisioned aggregator.toml (with its [workers] section), aimed at the test broker.
    data = tomllib.loads(pki.client(AGGREGATOR_USER, "toml").read_text())
    data.update(rounds=2, state_dir=str(tmp_path / "state"),
                model={"kind": "softmax", "n_features": 64, "n_outputs": 10},
                training={"epochs": 1, "batch_size": 16, "lr": 0.1},
                round={"min_agents": len(RUNNING), "quorum": len(RUNNING), "timeout": WAIT_S})
    data["workers"].update(spawn=False, collect_timeout=5.0)
    data["broker"].update(host=secure_broker.host, port=secure_broker.port)
    cfg = from_dict(AggregatorConfig, data)
    assert (cfg.workers.count, cfg.workers.username) == (2, WORKER_USER)
    agg = start_aggregator(cfg)
    c = agg.coordinator
    worker_loops: list[Loop] = []
    workers: list[IngestWorker] = []
    agent_loop = Loop()
    runners: list[AgentRunner] = []
    done: set[str] = set()
    all_done = threading.Event()

    def on_done(runner) -> None:
        done.add(runner.core.agent_id)
        if len(done) == len(RUNNING):
            all_done.set()

    try:
        for i in range(2):
            loop = Loop()
            workers.append(IngestWorker(cfg, i, loop))
            workers[-1].start()
            loop.start(name=f"test-ingest-{i}")
            worker_loops.append(loop)
        _wait(lambda: c.workers_online == {0, 1}, "both workers online with their ingest logins")
        shards = federated_digits(len(RUNNING), "iid", 0.5, 0)
        # train_delay: the round stays open a moment after it opens, for the attack below
        runners += [AgentRunner(agent_loop, AgentCore(agent_id=aid, fed=FED, data=d, seed=i),
                               snippet_broker(pki, aid, secure_broker), on_done=on_done, train_delay=0.5)
                   for i, (aid, d) in enumerate(zip(RUNNING, shards.agents))]
        for r in runners:
            r.start()
        agent_loop.start(name="test-secure-agents")

        # A device forges a claim (and a partial, a worker's status) while round 1 is open: the
        # broker drops them, the coordinator never sees them.
        _wait(lambda: c.open is not None, "round 1 open")
        attacker = connected(probe(**creds(pki, ATTACKER)))
        forged = iw.encode(iw.Claim(FED, c.open.round, 0, RUNNING[0], c.version, 12345, {"forged": 1.0}))
        offline = wire.encode(wire.StatusMsg(FED, 0, "ingest-0", "offline", 0, ["ingest"], "t", False))
        codes = {
            "claim 0": attacker.publish(f"fl/{FED}/ingest/0/claim", forged),
            "claim 1": attacker.publish(f"fl/{FED}/ingest/1/claim",
                                        iw.encode(iw.Claim(FED, c.open.round, 1, ATTACKER, c.version, 1))),
            "partial": attacker.publish(f"fl/{FED}/ingest/0/partial", b"forged partial"),
            "status": attacker.publish(f"fl/{FED}/ingest/0/status", offline, retain=True),
            "control": attacker.publish(f"fl/{FED}/ingest/1/control", b"forged grant"),
        }
        assert {k: str(rc) for k, rc in codes.items()} == {k: "Not authorized" for k in codes}
        time.sleep(0.3)
        assert not c.rejected, dict(c.rejected)
        assert not [a for a, g in dict(c.granted).items() if "forged" in g.metrics or g.num_samples == 12345]
        assert c.workers_online == {0, 1}
        attacker.close()

        agg.wait_finished(WAIT_S)
        assert all_done.wait(WAIT_S), "agents did not see the federation finish"
    finally:
        agent_loop.stop()
        for loop in worker_loops:
            loop.stop()
        for loop in [agent_loop, *worker_loops]:
            if loop.thread is not None:
                loop.thread.join(10)
    summaries = [agg.rounds.get_nowait().summary for _ in range(2)]
    assert [(s.selected, s.participants) for s in summaries] == [(len(RUNNING), len(RUNNING))] * 2
    assert all("forged" not in s.metrics for s in summaries)
    assert not c.rejected, dict(c.rejected)
    assert not [w.rejected for w in workers if w.rejected]
    assert all(w.fatal is None for w in workers)
    assert all(r.core.updates_sent == 2 for r in runners)
    # The broker split the stream between the two logins: together they summed the last round.
    assert all(w.counted for w in workers), [w.counted for w in workers]
    assert sorted(a for w in workers for a in w.counted) == RUNNING
    log = secure_broker.log_path.read_text()
    for i in range(2):
        assert f"u'{worker_user(i)}'" in log, f"worker {i} did not log in as {worker_user(i)}"
    # Positive control: the same claim from worker 0's login does reach the coordinator
    # (no round is open any more: refused as no_open_round).
    worker0 = connected(probe(**worker_creds(pki, 0)))
    assert not worker0.publish(f"fl/{FED}/ingest/0/claim", forged).is_failure
    _wait(lambda: c.rejected, "the control claim at the coordinator")
    time.sleep(0.1)
    assert dict(c.rejected) == {"no_open_round": 1}


@pytest.mark.broker
def test_the_acl_keeps_devices_out_of_the_ingest_topics_and_workers_apart(pki, probe):
    aggregator = connected(probe(**creds(pki, AGGREGATOR_USER)))
    aggregator.subscribe(f"fl/{FED}/#")
    w0 = connected(probe(**worker_creds(pki, 0)))
    w0.subscribe(f"fl/{FED}/ingest/1/control", f"fl/{FED}/ingest/+/control", f"fl/{FED}/ingest/#",
                 f"fl/{FED}/#", f"$share/g/fl/{FED}/update/+")
    device = connected(probe(**creds(pki, ATTACKER)))
    device.subscribe(f"fl/{FED}/ingest/#", f"fl/{FED}/ingest/0/control", f"$share/g/fl/{FED}/ingest/+/claim",
                     f"fl/{FED}/agent/{ATTACKER}/inbox")
    w1 = connected(probe(**worker_creds(pki, 1)))

    # What no device may write, nor a worker on another worker's topics, its own control or a device's
    denied = {
        "device": (device, [f"fl/{FED}/ingest/{i}/{t}" for i in (0, 1) for t in ("claim", "partial", "status",
                                                                                   "control")]),
        "ingest-0": (w0, [f"fl/{FED}/ingest/1/claim", f"fl/{FED}/ingest/1/partial", f"fl/{FED}/ingest/1/status",
                          f"fl/{FED}/ingest/0/control", f"fl/{FED}/ingest/1/control", f"fl/{FED}/update/{AGENTS[0]}",
                          f"fl/{FED}/model", f"fl/{FED}/task", f"fl/{FED}/agent/{AGENTS[0]}/inbox"]),
    }
    codes = {f"{who} -> {t}": str(p.publish(t, b"forged " + t.encode()))
             for who, (p, topics) in denied.items() for t in topics}
    assert codes == {k: "Not authorized" for k in codes}
    # What worker 0 may write: its own claim, partial and status
    for t in ("claim", "partial", "status"):
        assert not w0.publish(f"fl/{FED}/ingest/0/{t}", f"w0 {t}".encode()).is_failure
    assert not w1.publish(f"fl/{FED}/ingest/1/claim", b"w1 claim").is_failure
    got = aggregator.received(until=b"w1 claim")
    assert got == [(f"fl/{FED}/ingest/0/{t}", f"w0 {t}".encode()) for t in ("claim", "partial", "status")] + \
        [(f"fl/{FED}/ingest/1/claim", b"w1 claim")], "only the workers' own messages reach the coordinator"

    # What worker 0 may read: the updates and its own control topic; not worker 1's control
    aggregator.publish(f"fl/{FED}/ingest/1/control", b"secret grant for worker 1")
    aggregator.publish(f"fl/{FED}/ingest/1/partial", b"secret partial of worker 1")
    connected(probe(**creds(pki, AGENTS[0]))).publish(f"fl/{FED}/update/{AGENTS[0]}", b"an update")
    aggregator.publish(f"fl/{FED}/agent/{ATTACKER}/inbox", b"control inbox")
    aggregator.publish(f"fl/{FED}/ingest/0/control", b"control grant for worker 0")
    seen = set(w0.received(until=b"control grant for worker 0"))
    assert seen == {(f"fl/{FED}/update/{AGENTS[0]}", b"an update"),
                    (f"fl/{FED}/ingest/0/control", b"control grant for worker 0")}, seen
    # A device reads nothing under ingest/ (not even the workers' retained status)
    assert device.received(until=b"control inbox") == [(f"fl/{FED}/agent/{ATTACKER}/inbox", b"control inbox")]
    w0.publish(f"fl/{FED}/ingest/0/status", b"", retain=True)  # clear the retained status
