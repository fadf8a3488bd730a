"""Secure aggregation over a real mosquitto: exact sums, devices that die at each stage, a killed aggregator.

Devices here are scripted on plain paho clients (with a last will, as real
agents have) so that a test can stop one exactly after a given stage and
close its connection without a clean disconnect, and so that their updates
sit on the quantization grid, where the unmasked integer sum can be checked
exactly. The real agent (edge_agent.agent) runs the same client code in the
demo test at the end.
"""

from __future__ import annotations

import io
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

import aggregator.secagg as secagg_mod
from aggregator import checkpoint
from aggregator.config import AggregatorConfig, ModelConfig, RoundConfig, SecAggConfig, SecurityConfig
from aggregator.journal import JournalFile
from edge_agent import wire
from edge_agent.models import BuiltinModel
from edge_agent.secagg import messages as M
from edge_agent.secagg.client import SecAggClient
from edge_agent.secagg.quantize import levels
from edge_agent.topics import Topics

from .conftest import WAIT_S
from .test_durability import start_aggregator_process, wait_until

pytestmark = pytest.mark.broker

N_FEATURES = 19  # linear model: 20 parameters
QBITS, RANGE = 16, 1.0
STAGES = {M.SAPeers: 2, M.SARoute: 3, M.SAUnmaskReq: 4}  # the stage each inbox message starts


def grid_update(name: str, attempt: int) -> tuple[np.ndarray, np.ndarray]:
    """(integers, float update) of one device: exactly on the quantization grid."""
    rng = np.random.default_rng([sum(name.encode()), attempt])
    k = rng.integers(0, levels(QBITS) + 1, N_FEATURES + 1)
    return k, k * (2 * RANGE / levels(QBITS)) - RANGE


class SADevice:
    """A device that runs the secure-aggregation client over its own MQTT connection.

    ``die_after``: stop after sending the message of this stage (1 keys, 2
    shares, 3 masked input) and close the socket without DISCONNECT, so the
    broker publishes the last will. ``hold_at``: in attempt 0, do not answer
    the inbox message that starts this stage (to freeze the round there).
    """

    def __init__(self, broker, fed: str, name: str, die_after: int = 0, hold_at: int = 0, samples: int = 1) -> None:
        self.fed, self.name, self.t = fed, name, Topics(fed)
        self.die_after, self.hold_at, self.samples = die_after, hold_at, samples
        self.client: SecAggClient | None = None
        self.sent: dict[tuple[int, int], int] = {}  # (round, attempt) -> last stage sent
        self.selection: dict[tuple[int, int], list[str]] = {}  # (round, attempt) -> its notice's selection
        self.held = threading.Event()
        self.dead = False
        self.inputs: dict[tuple[int, int], np.ndarray] = {}
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"sa-{fed}-{name}", protocol=paho.MQTTv5)
        self.c.will_set(self.t.status(name), wire.encode(wire.StatusMsg(fed, 0, name, "offline", 1, ["linear"])),
                        qos=1, retain=True)
        self.c.on_message = self._on_message
        connected = threading.Event()
        self.c.on_connect = lambda *a: connected.set()
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()
        assert connected.wait(WAIT_S)
        self.c.subscribe([(self.t.selected(name), 1), (self.t.task, 1), (self.t.inbox(name), 1)])
        time.sleep(0.05)
        self.c.publish(self.t.status(name), wire.encode(wire.StatusMsg(fed, 0, name, "online", samples, ["linear"])),
                       qos=1, retain=True).wait_for_publish(WAIT_S)

    def _send(self, stage: int, msg) -> None:
        # (no wait_for_publish: this runs on paho's network thread, which must stay free to get the PUBACK)
        self.c.publish(self.t.update(self.name), M.encode(msg), qos=1)
        self.sent[(msg.round, msg.attempt)] = stage
        if stage == self.die_after:
            self.dead = True  # nothing more from us; the test thread closes the socket

    def _on_message(self, client, userdata, m) -> None:
        if self.dead or not m.payload:
            return
        try:
            if m.topic == self.t.selected(self.name):
                n = wire.decode(m.payload, expect="selected")
                self.selection[(n.round, n.attempt)] = n.selected  # it comes before the task
                return
            if m.topic == self.t.task:
                task = wire.decode(m.payload, expect="task")
                key = (task.round, task.attempt)
                chosen = self.selection.get(key, [])
                if task.state != "open" or task.secagg is None or self.name not in chosen or key in self.sent:
                    return
                k, x = grid_update(self.name, task.attempt)
                self.inputs[key] = k
                weight = min(self.samples, task.secagg.max_weight) if task.secagg.max_weight else 1
                self.client = SecAggClient(self.fed, self.name, task.round, task.attempt, chosen,
                                           task.secagg, x, weight=weight)
                self._send(1, self.client.advertise())
                return
            msg = M.decode(m.payload, fed=self.fed, kinds=M.SERVER_KINDS)
            stage = STAGES[type(msg)]
            if msg.attempt == 0 and stage == self.hold_at:
                self.held.set()
                return
            c = self.client
            reply = {M.SAPeers: c.on_peers, M.SARoute: c.on_route, M.SAUnmaskReq: c.on_unmask_req}[type(msg)](msg)
            self._send(stage, reply)
        except Exception as exc:  # a test device must not kill paho's thread
            print(f"{self.name}: {exc!r}", file=sys.stderr)

    def kill_connection(self) -> None:
        """The device dies: no DISCONNECT, the TCP connection just ends (the broker sends the will)."""
        self.dead = True
        sock = self.c.socket()
        self.c.loop_stop()
        if sock is not None:
            sock.close()

    def close(self) -> None:
        if not self.c.is_connected():
            return
        self.c.publish(self.t.status(self.name), b"", qos=1, retain=True)
        self.c.disconnect()
        self.c.loop_stop()


def sa_config(fed: str, bcfg, tmp_path: Path, n: int, mode: str = "secagg", **sa) -> AggregatorConfig:
    return AggregatorConfig(
        federation=fed, rounds=1, state_dir=str(tmp_path / "state"),
        model=ModelConfig(kind="linear", n_features=N_FEATURES, n_outputs=1),
        round=RoundConfig(min_agents=n, quorum=1, timeout=WAIT_S),
        secagg=SecAggConfig(mode=mode, bits=QBITS, range=RANGE, stage_timeout=WAIT_S, **sa),
        security=SecurityConfig(rate_limit=0.0),
        broker=bcfg,
    )


@pytest.fixture
def capture_rounds(monkeypatch):
    """Every SecAggRound the coordinator makes (to read the exact integer sum it unmasked)."""
    made = []
    real = secagg_mod.make_round

    def make(*a, **kw):
        r = real(*a, **kw)
        made.append(r)
        return r

    monkeypatch.setattr(secagg_mod, "make_round", make)
    return made


def _expected_params(initial: dict, devices: list[SADevice], key=(1, 0)) -> dict:
    xs = [d.inputs[key] * (2 * RANGE / levels(QBITS)) - RANGE for d in devices]
    mean = (sum(xs) / len(xs)).astype(np.float32)
    return {"W0": initial["W0"] + mean[:N_FEATURES].reshape(N_FEATURES, 1), "b0": initial["b0"] + mean[N_FEATURES:]}


def _run(fed, broker, broker_config, tmp_path, start_aggregator, capture_rounds, n=10, die=(), die_after=0,
         mode="secagg", **sa):
    devices = [SADevice(broker, fed, f"d{i:02d}", die_after=die_after if i in die else 0) for i in range(n)]
    cfg = sa_config(fed, broker_config, tmp_path, n, mode, **sa)
    initial = BuiltinModel(cfg.model.spec()).init_params(cfg.model.seed)
    agg = start_aggregator(cfg)
    for d in devices:
        if d.die_after:
            wait_until(lambda d=d: d.dead, what=f"{d.name} to reach stage {die_after}")
            d.kill_connection()
    return agg, devices, initial


@pytest.mark.parametrize("mode", ["secagg", "secagg+"])
def test_ten_devices_exact_sum_and_the_model_is_fedavg_of_their_inputs(fed, broker, broker_config, tmp_path,
                                                                       start_aggregator, capture_rounds, mode):
    extra = {"degree": 4} if mode == "secagg+" else {}
    agg, devices, initial = _run(fed, broker, broker_config, tmp_path, start_aggregator, capture_rounds, mode=mode,
                                 **extra)
    try:
        agg.wait_finished()
        (rnd,) = capture_rounds
        assert rnd.stage == "done" and rnd.contributors == {d.name for d in devices}
        assert np.array_equal(rnd.sum_int, sum(d.inputs[(1, 0)] for d in devices).astype(np.uint64))
        final = agg.coordinator.params
        for k, v in _expected_params(initial, devices).items():
            np.testing.assert_allclose(final[k], v, atol=1e-6)
        # What the aggregator kept: in memory only the running sum; on disk (journal, checkpoint)
        # no device's input in any encoding it could take.
        arrays = {name for name, v in vars(rnd).items() if isinstance(v, np.ndarray)}
        assert arrays <= {"sum_int", "result"} and rnd.total is None
        disk = b"".join(p.read_bytes() for p in (tmp_path / "state").rglob("*") if p.is_file())
        assert disk
        for d in devices:
            k = d.inputs[(1, 0)]
            x = k * (2 * RANGE / levels(QBITS)) - RANGE
            for enc in (k.astype("<u4"), k.astype("<u8"), x.astype("<f4"), x.astype("<f8")):
                assert enc.tobytes()[:32] not in disk, f"{d.name}'s input is on disk"
    finally:
        for d in devices:
            d.close()


@pytest.mark.parametrize("max_weight", [0, 300], ids=["cap-from-statuses", "configured-cap"])
def test_updates_are_weighted_by_the_sample_counts_the_devices_report(fed, broker, broker_config, tmp_path,
                                                                     start_aggregator, capture_rounds, max_weight):
    samples = [50, 100, 200, 400, 800]
    devices = [SADevice(broker, fed, f"d{i:02d}", samples=s) for i, s in enumerate(samples)]
    cfg = sa_config(fed, broker_config, tmp_path, len(devices), max_weight=max_weight)
    initial = BuiltinModel(cfg.model.spec()).init_params(cfg.model.seed)
    agg = start_aggregator(cfg)
    try:
        agg.wait_finished()
        (rnd,) = capture_rounds
        cap = max_weight or max(samples)
        weights = [min(s, cap) for s in samples]
        assert rnd.stage == "done" and rnd.params.max_weight == cap
        assert int(rnd.sum_int[-1]) == sum(weights)  # the total weight, exact
        xs = [d.inputs[(1, 0)] * (2 * RANGE / levels(QBITS)) - RANGE for d in devices]
        mean = sum(w * x for w, x in zip(weights, xs)) / sum(weights)
        got = np.concatenate([(agg.coordinator.params[k] - initial[k]).ravel() for k in ("W0", "b0")])
        tol = len(devices) * (2 * RANGE / levels(QBITS)) * cap / sum(weights) + 1e-6  # rounding of scaled inputs
        np.testing.assert_allclose(got, mean, atol=tol)
        assert np.abs(got - sum(xs) / len(xs)).max() > 10 * tol  # and not the unweighted mean
    finally:
        for d in devices:
            d.close()


@pytest.mark.parametrize("stage", [1, 2, 3], ids=["after-keys", "after-shares", "after-masked-input"])
def test_thirty_percent_die_at_each_stage_and_the_sum_of_the_survivors_is_exact(
        fed, broker, broker_config, tmp_path, start_aggregator, capture_rounds, stage):
    agg, devices, initial = _run(fed, broker, broker_config, tmp_path, start_aggregator, capture_rounds,
                                 die=(1, 4, 7), die_after=stage)
    try:
        agg.wait_finished()
        (rnd,) = capture_rounds
        contributors = [d for d in devices if stage == 3 or not d.die_after]
        assert rnd.stage == "done" and rnd.contributors == {d.name for d in contributors}
        assert np.array_equal(rnd.sum_int, sum(d.inputs[(1, 0)] for d in contributors).astype(np.uint64))
        for k, v in _expected_params(initial, contributors).items():
            np.testing.assert_allclose(agg.coordinator.params[k], v, atol=1e-6)
        if stage == 3:  # inputs arrived, so the dead devices' self masks were recovered from the others' shares
            assert len(rnd.self_shares) == 10
        else:
            assert set(rnd.key_shares) == ({"d01", "d04", "d07"} if stage == 2 else set())
    finally:
        for d in devices:
            d.close()


def test_below_the_threshold_the_round_aborts_and_no_model_is_published(
        fed, broker, broker_config, tmp_path, start_aggregator, capture_rounds, raw_client):
    watcher = raw_client()
    watcher.subscribe(Topics(fed).model)
    agg, devices, _ = _run(fed, broker, broker_config, tmp_path, start_aggregator, capture_rounds,
                           die=(0, 1, 2, 3, 4, 5), die_after=2)  # t = 5 of 9 peers; 4 survive
    try:
        wait_until(lambda: capture_rounds and capture_rounds[0].stage == "aborted", what="the abort")
        time.sleep(0.3)
        assert agg.coordinator.round == 0 and agg.coordinator.rejected["secagg_aborted"] == 1
        models = []
        while not watcher.messages.empty():
            models.append(wire.decode(watcher.messages.get()[1], expect="model").round)
        assert models and set(models) == {0}  # only the initial model, never a partial sum
    finally:
        for d in devices:
            d.close()


@pytest.mark.parametrize("hold_at", [2, 3, 4], ids=["after-keys", "after-shares", "after-masked-input"])
def test_aggregator_killed_at_each_stage_aborts_the_round_and_reruns_it_exactly(fed, broker, tmp_path, hold_at,
                                                                               raw_client):
    state = tmp_path / "state"
    toml = tmp_path / "agg.toml"
    toml.write_text(
        f'federation = "{fed}"\nrounds = 1\nstate_dir = "{state}"\n'
        f'[model]\nkind = "linear"\nn_features = {N_FEATURES}\nn_outputs = 1\n'
        f"[round]\nmin_agents = 5\nquorum = 1\ntimeout = {WAIT_S}\n"
        f'[secagg]\nmode = "secagg"\nbits = {QBITS}\nrange = {RANGE}\nstage_timeout = {WAIT_S}\n'
        "[security]\nrate_limit = 0\n"
    )
    watcher = raw_client()
    watcher.subscribe(Topics(fed).model)
    devices = [SADevice(broker, fed, f"d{i:02d}", hold_at=hold_at) for i in range(5)]
    agg = start_aggregator_process(toml, broker)
    try:
        for d in devices:
            assert d.held.wait(WAIT_S), f"{d.name} never reached stage {hold_at}"
        assert any(r["type"] == "open" for r in JournalFile(state).load())
        agg.send_signal(signal.SIGKILL)
        agg.wait(10)
        agg = start_aggregator_process(toml, broker)
        out, _ = agg.communicate(timeout=WAIT_S * 2)
        assert agg.returncode == 0, out
        assert "restarted during secure aggregation" in out
    finally:
        if agg.poll() is None:
            agg.kill()
        for d in devices:
            d.close()
    final = checkpoint.load(state)
    assert final["round"] == 1 and final["history"][-1]["attempt"] == 1
    initial = BuiltinModel(ModelConfig(kind="linear", n_features=N_FEATURES, n_outputs=1).spec()).init_params(0)
    for k, v in _expected_params(initial, devices, key=(1, 1)).items():
        np.testing.assert_allclose(final["params"][k], v, atol=1e-6)
    rounds = []
    while not watcher.messages.empty():
        t, payload, _ = watcher.messages.get()
        rounds.append(wire.decode(payload, expect="model").round)
    assert rounds.count(1) == 1  # one round-1 model: the exact one; nothing partial before it


def test_the_demo_with_real_agents_and_secure_aggregation(tmp_path):
    from aggregator.demo import DemoOptions, run_demo

    out = io.StringIO()
    result = run_demo(DemoOptions(agents=10, rounds=10, secagg="secagg+", out=str(tmp_path / "o")), out)
    assert len(result.rounds) == 10 and all(s.participants == 10 for s in result.rounds)
    assert result.final_accuracy > 0.85, out.getvalue()


def test_the_demo_with_secure_aggregation_and_distributed_dp_reports_the_accounted_epsilon(tmp_path):
    from aggregator.accounting import epsilon_for
    from aggregator.demo import DemoOptions, run_demo

    out = io.StringIO()
    result = run_demo(DemoOptions(agents=40, rounds=6, secagg="secagg", dp="distributed", noise=1.0, expected=20,
                                  out=str(tmp_path / "o")), out)
    eps = [s.metrics["epsilon"] for s in result.rounds]
    assert len(eps) == 6 and eps == sorted(eps)
    # every drawn round is charged; all 40 agents are online before the first draw, so none is too small
    assert eps[-1] == pytest.approx(epsilon_for(40, 20, 6, 1.0, 1e-5), rel=1e-6)
    assert result.final_accuracy > 0.15  # learns through the noise (chance is 0.1)


def test_secure_aggregation_config_errors_name_the_key():
    from edge_agent.config import ConfigError, from_dict

    base = {"secagg": {"mode": "secagg"}, "round": {"min_agents": 100}}
    with pytest.raises(ConfigError, match="privacy.mode"):
        from_dict(AggregatorConfig, {**base, "privacy": {"mode": "central", "expected_per_round": 50,
                                                         "population": 100}})
    with pytest.raises(ConfigError, match="round.min_agents"):  # draws too small too often
        from_dict(AggregatorConfig, {**base, "privacy": {"mode": "distributed", "expected_per_round": 3,
                                                         "population": 100}})
    with pytest.raises(ConfigError, match="secagg.mode"):
        from_dict(AggregatorConfig, {**base, "strategy": {"name": "median"}})
    with pytest.raises(ConfigError, match="secagg.bits"):
        from_dict(AggregatorConfig, {"secagg": {"mode": "secagg", "bits": 30}})
    with pytest.raises(ConfigError, match="secagg.weighting"):  # DP needs a fixed denominator
        from_dict(AggregatorConfig, {**base, "secagg": {"mode": "secagg", "weighting": "samples"},
                                     "privacy": {"mode": "distributed", "expected_per_round": 50, "population": 100}})
    with pytest.raises(ConfigError, match="secagg.weighting"):
        from_dict(AggregatorConfig, {"secagg": {"mode": "secagg", "weighting": "by-size"}})
    with pytest.raises(ConfigError, match="secagg.max_weight"):  # the weight is one 8-bit coordinate here
        from_dict(AggregatorConfig, {"secagg": {"mode": "secagg", "bits": 8, "max_weight": 256}})
    cfg = from_dict(AggregatorConfig, {**base, "privacy": {"mode": "distributed", "expected_per_round": 50,
                                                           "population": 100}})
    assert cfg.secagg.mode == "secagg"
