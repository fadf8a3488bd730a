"""Seeing the fleet: the Prometheus endpoint, the JSON copy of metrics, and metrics.csv, over a real broker."""

from __future__ import annotations

import csv
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from aggregator.config import AggregatorConfig, MetricsConfig, ModelConfig, RoundConfig, TrainingConfig
from aggregator.coordinator import AgentInfo
from aggregator.datasets import federated_digits
from aggregator.metrics_log import FIXED_COLUMNS, MetricsCsv, metrics_json
from aggregator.sim import Simulation
from edge_agent import wire
from edge_agent.config import ConfigError, from_dict
from edge_agent.mqtt import Loop
from edge_agent.topics import Topics

from .conftest import WAIT_S

FEDMQTT = str(Path(sys.executable).parent / "fedmqtt")
GARBAGE = b"\xc1 not msgpack"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(fed, broker_config, tmp_path, rounds=3, min_agents=3, listen="") -> AggregatorConfig:
    return AggregatorConfig(
        federation=fed, rounds=rounds, state_dir=str(tmp_path / "state"),
        model=ModelConfig(kind="softmax", n_features=64, n_outputs=10),
        training=TrainingConfig(epochs=1, batch_size=16, lr=0.1),
        round=RoundConfig(min_agents=min_agents, quorum=1, timeout=WAIT_S),
        metrics=MetricsConfig(listen=listen), broker=broker_config,
    )


def scrape(address) -> dict[tuple[str, frozenset], float]:
    """Every sample of the endpoint: (sample name, labels without `federation`) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    host, port = address
    text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = dict(s.labels)
            labels.pop("federation", None)
            out[(s.name, frozenset(labels.items()))] = s.value
    return out


def value(samples, name: str, **labels) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def by_label(samples, name: str, label: str) -> dict[str, float]:
    return {dict(k)[label]: v for (n, k), v in samples.items() if n == name and k}


def wait_until(cond, what: str, timeout: float = WAIT_S) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")
        time.sleep(0.02)


def frozen(loop: Loop):
    """Hold the aggregator's loop (the metrics thread keeps serving); returns the release."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        held.set()
        release.wait(WAIT_S)

    loop.call_soon_threadsafe(hold)
    assert held.wait(WAIT_S)
    return release.set


def status(fed, agent, state="online", eligible=True, reason="", capabilities=("softmax",)) -> bytes:
    return wire.encode(wire.StatusMsg(fed, 0, agent, state, 10, list(capabilities), eligible=eligible, reason=reason))


@pytest.mark.broker
def test_prometheus_endpoint_tells_what_the_coordinator_knows(fed, broker_config, tmp_path, start_aggregator,
                                                             raw_client):
    topics = Topics(fed)
    port = free_port()
    ra = start_aggregator(config(fed, broker_config, tmp_path, rounds=3, min_agents=3, listen=f"127.0.0.1:{port}"))
    address = ra.service.metrics_address
    assert address == ("127.0.0.1", port)
    before = scrape(address)
    assert value(before, "fedmqtt_round") == 0 and value(before, "fedmqtt_agents_online") == 0
    assert value(before, "fedmqtt_finished") == 0 and value(before, "fedmqtt_dp_epsilon") is None  # no DP

    # Devices that cannot train, an offline one, and one garbage update.
    dev = raw_client("metrics-devices")
    statuses = {
        "pi-battery": status(fed, "pi-battery", eligible=False, reason="battery at 12%, below 30%"),
        "pi-problem": status(fed, "pi-problem", eligible=False,
                             reason="spec_mismatch: model needs 64 features, data has 8"),
        "pi-linear": status(fed, "pi-linear", capabilities=("linear",)),  # eligible, but not for this model
        "pi-gone": status(fed, "pi-gone", state="offline"),
    }
    for agent, payload in statuses.items():
        dev.publish(topics.status(agent), payload, retain=True)
    c = ra.coordinator
    wait_until(lambda: len(c.agents) == 4, lambda: f"the statuses: {sorted(c.agents)}")
    # (an update is not retained: sent once the aggregator is known to be subscribed)
    dev.publish(topics.update("pi-rogue"), GARBAGE)
    with pytest.raises(wire.WireError) as bad:
        wire.decode(GARBAGE, expect="update")
    reason = bad.value.reason
    wait_until(lambda: c.rejected.get(reason) == 1, lambda: f"the garbage update: {dict(c.rejected)}")

    data = federated_digits(3, "iid", 0.5, 0)
    sim = Simulation(broker_config, fed, data.agents, seed=0)
    sim.start()
    try:
        first = ra.rounds.get(timeout=WAIT_S).summary
        # During the run: with the aggregator's loop held, its state and the endpoint must agree exactly.
        release = frozen(ra.loop)
        try:
            during = scrape(address)
            assert value(during, "fedmqtt_round") == c.round >= first.round
            assert value(during, "fedmqtt_round_attempt") == (c.open.attempt if c.open else c.attempt)
            assert value(during, "fedmqtt_round_open") == (1 if c.open else 0)
            last = c.history[-1]
            assert value(during, "fedmqtt_last_round_participants") == last.participants == 3
            assert value(during, "fedmqtt_last_round_selected") == last.selected
            assert value(during, "fedmqtt_last_round_dropouts") == last.metrics["dropouts"]
            assert by_label(during, "fedmqtt_rejections_total", "reason") == dict(c.rejected) == {reason: 1}
            assert value(during, "fedmqtt_agents_online") == sum(i.online for i in c.agents.values()) == 6
            assert value(during, "fedmqtt_agents_eligible") == 3
            assert value(during, "fedmqtt_agents_known") == len(c.agents) == 7
            assert by_label(during, "fedmqtt_agents_not_eligible", "reason") == {
                "battery_low": 1, "spec_mismatch": 1, "unsupported_model": 1}
        finally:
            release()
        ra.wait_finished()
        assert sim.finished.wait(WAIT_S)
        # A device recovers: it leaves the not-eligible count for its reason, which stays at 0.
        dev.publish(topics.status("pi-battery"), status(fed, "pi-battery"), retain=True)
        wait_until(lambda: c.agents["pi-battery"].eligible, "the recovered device")
        wait_until(lambda: value(scrape(address), "fedmqtt_agents_eligible") == 4, "the eligible count")
        after = scrape(address)
    finally:
        sim.stop()
        for agent in statuses:
            dev.publish(topics.status(agent), b"", retain=True)
    summaries = c.history
    assert [s.round for s in summaries] == [1, 2, 3]
    assert value(after, "fedmqtt_round") == 3 and value(after, "fedmqtt_finished") == 1
    assert value(after, "fedmqtt_round_open") == 0
    assert value(after, "fedmqtt_last_round_participants") == summaries[-1].participants == 3
    assert value(after, "fedmqtt_rounds_closed_total") == 3
    assert value(after, "fedmqtt_rounds_abandoned_total") == 0
    assert value(after, "fedmqtt_updates_accepted_total") == c.accepted == 9
    assert by_label(after, "fedmqtt_rejections_total", "reason") == dict(c.rejected) == {reason: 1}
    assert by_label(after, "fedmqtt_agents_not_eligible", "reason") == {
        "battery_low": 0, "spec_mismatch": 1, "unsupported_model": 1}
    assert value(after, "fedmqtt_round_duration_seconds_count") == 3
    assert value(after, "fedmqtt_round_duration_seconds_sum") == pytest.approx(sum(s.seconds for s in summaries))
    assert value(after, "fedmqtt_last_round_duration_seconds") == pytest.approx(summaries[-1].seconds)
    # 3 openings + 9 updates journaled; a checkpoint at start (new run id) and per round
    assert value(after, "fedmqtt_journal_append_seconds_count") == 12
    # Group commit: one fsync per opening (before its task), at most one per read pass of
    # updates; a round's closing pass is covered by its checkpoint instead.
    assert 3 <= value(after, "fedmqtt_journal_fsync_seconds_count") <= 9
    assert value(after, "fedmqtt_checkpoint_save_seconds_count") == 4
    assert value(after, "fedmqtt_onnx_export_failures_total") == ra.service.onnx_failures == 0
    # The endpoint stops with the service.
    ra.stop()
    wait_until(lambda: not _answers(address), "the endpoint to stop", timeout=10)


def _answers(address) -> bool:
    try:
        scrape(address)
        return True
    except OSError:
        return False


@pytest.mark.broker
def test_json_mirror_equals_the_msgpack_metrics(fed, broker_config, tmp_path, start_aggregator, raw_client):
    topics = Topics(fed)
    observer = raw_client()
    observer.subscribe(topics.metrics)
    observer.subscribe(topics.metrics_json)
    ra = start_aggregator(config(fed, broker_config, tmp_path, rounds=2, min_agents=2),
                          evaluate=lambda p: {"accuracy": 0.5})
    sim = Simulation(broker_config, fed, federated_digits(2, "iid", 0.5, 0).agents, seed=0)
    sim.start()
    try:
        ra.wait_finished()
    finally:
        sim.stop()
    got = {"msgpack": [], "json": []}
    while len(got["msgpack"]) < 2 or len(got["json"]) < 2:
        topic, payload, _ = observer.messages.get(timeout=WAIT_S)
        got["msgpack" if topic == topics.metrics else "json"].append(payload)
    for packed, text in zip(got["msgpack"], got["json"]):
        mirror = json.loads(text)
        raw = wire.unpack(packed)
        decoded = wire.decode(packed, expect="metrics", fed=fed)
        assert mirror == raw  # the same map, field for field
        assert (mirror["kind"], mirror["fed"], mirror["round"], mirror["version"], mirror["participants"]) == \
            ("metrics", decoded.fed, decoded.round, decoded.version, decoded.participants)
        assert mirror["metrics"]["test_accuracy"] == decoded.metrics["test_accuracy"] == 0.5
    assert [json.loads(t)["round"] for t in got["json"]] == [1, 2]
    # Retained: a reader that comes later gets the last round's copy, equal to the retained msgpack.
    late = raw_client()
    late.subscribe(topics.metrics_json)
    text, retained = late.wait_for(topics.metrics_json)
    assert retained and json.loads(text) == json.loads(metrics_json(got["msgpack"][-1]))
    assert Topics(fed).parse(topics.metrics_json) == ("metrics/json", None)
    assert Topics(fed).parse(topics.metrics) == ("metrics", None)


def test_json_mirror_has_null_for_nan_and_infinities():
    import msgpack

    packed = msgpack.packb({"v": 1, "kind": "metrics", "round": 3,
                            "metrics": {"a": float("nan"), "b": float("inf"), "c": 0.25},
                            "history": [{"round": 3.0, "d": float("-inf")}]})
    assert json.loads(metrics_json(packed)) == {"v": 1, "kind": "metrics", "round": 3,
                                                "metrics": {"a": None, "b": None, "c": 0.25},
                                                "history": [{"round": 3.0, "d": None}]}


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as fh:
        header = next(csv.reader(fh))
    with path.open(newline="") as fh:
        return header, list(csv.DictReader(fh))


@pytest.mark.broker
def test_metrics_csv_one_row_per_round_and_a_restart_appends(fed, broker_config, tmp_path, start_aggregator):
    data = federated_digits(2, "iid", 0.5, 0)
    cfg = config(fed, broker_config, tmp_path, rounds=2, min_agents=2)
    ra = start_aggregator(cfg, evaluate=lambda p: {"accuracy": 0.5})
    sim = Simulation(broker_config, fed, data.agents, seed=0)
    sim.start()
    try:
        ra.wait_finished()
    finally:
        sim.stop()
    ra.stop()
    path = Path(cfg.state_dir) / "metrics.csv"
    header, rows = _rows(path)
    assert len(header) == len(set(header)), header  # one `seconds`, not two
    assert tuple(header[:6]) == FIXED_COLUMNS and header.count("seconds") == 1
    assert "test_accuracy" in header and "dropouts" in header
    assert [(r["round"], r["participants"], r["selected"], r["attempt"]) for r in rows] == \
        [("1", "2", "2", "0"), ("2", "2", "2", "0")]
    history = ra.coordinator.history
    assert [r["version"] for r in rows] == [s.version for s in history]
    assert [float(r["seconds"]) for r in rows] == pytest.approx([s.seconds for s in history], abs=1e-4)
    # A crash after the checkpoint of round 2 and before its row, mid-write of the row: on restart the
    # torn line goes, round 2 comes back from the checkpoint's history, and rounds 3 and 4 follow.
    lines = path.read_text().splitlines(keepends=True)
    assert len(lines) == 3 and lines[2].startswith("2,0,2,2,")
    path.write_text("".join(lines[:2]) + "2,0,")
    cfg2 = config(fed, broker_config, tmp_path, rounds=4, min_agents=2)
    ra2 = start_aggregator(cfg2, evaluate=lambda p: {"accuracy": 0.5})
    sim2 = Simulation(broker_config, fed, data.agents, seed=0)
    sim2.start()
    try:
        ra2.wait_finished()
    finally:
        sim2.stop()
    header2, rows2 = _rows(path)
    assert header2 == header
    assert path.read_text().count("round,attempt,") == 1  # the header once
    assert [int(r["round"]) for r in rows2] == [1, 2, 3, 4]
    assert [r["version"] for r in rows2] == [s.version for s in ra2.coordinator.history]


def test_metrics_csv_widens_its_header_for_a_new_metric(tmp_path):
    from aggregator.coordinator import RoundSummary

    def rnd(r, **m):
        return RoundSummary(round=r, attempt=0, selected=2, participants=2, version=f"v{r}", opened_at=0.0,
                            closed_at=1.5, metrics={"seconds": 1.5, **m})

    path = tmp_path / "metrics.csv"
    log = MetricsCsv(path)
    history = [rnd(1, train_loss=0.5)]
    assert log.append(history) == 1 and log.append(history) == 0  # a round is written once
    history.append(rnd(2, train_loss=0.25, eval_accuracy=0.75))
    assert log.append(history) == 1
    header, rows = _rows(path)
    assert header == [*FIXED_COLUMNS, "eval_accuracy", "train_loss"]
    assert [(r["round"], r["eval_accuracy"], r["train_loss"]) for r in rows] == \
        [("1", "", "0.5"), ("2", "0.75", "0.25")]
    # Reopened (a restart): the header is read back, nothing is written twice.
    again = MetricsCsv(path, current_round=2)
    assert again.last_round == 2 and again.append(history) == 0
    # A federation reset on the same state_dir (round 0 again): the old file is kept aside.
    fresh = MetricsCsv(path, current_round=0)
    assert fresh.last_round == 0 and not path.exists()
    assert (tmp_path / "metrics-before-reset-2.csv").exists()


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize("listen", ["9108", "127.0.0.1", "127.0.0.1:http", "127.0.0.1:70000",
                                    "http://127.0.0.1:9108", "::1:9108"])
def test_a_bad_listen_value_names_metrics_listen(listen):
    with pytest.raises(ConfigError, match=r"^metrics\.listen: "):
        from_dict(AggregatorConfig, {"metrics": {"listen": listen}})


@pytest.mark.parametrize("listen", ["", "127.0.0.1:9108", "localhost:0", "[::1]:9108", "0.0.0.0:9108"])
def test_good_listen_values(listen):
    assert from_dict(AggregatorConfig, {"metrics": {"listen": listen}}).metrics.listen == listen


def test_the_cli_flag_reports_a_bad_listen_value_in_one_line(tmp_path):
    proc = subprocess.run([FEDMQTT, "aggregator", "--metrics-listen", "localhost", "--state-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("fedmqtt aggregator: config error: metrics.listen: "), proc.stderr


def test_a_port_in_use_is_a_config_error_naming_the_key(tmp_path):
    from aggregator.service import AggregatorService
    from edge_agent.config import BrokerConfig

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = config("inuse", BrokerConfig(), tmp_path, listen=f"127.0.0.1:{port}")  # never connects
        service = AggregatorService(cfg, Loop())
        with pytest.raises(ConfigError, match=r"^metrics\.listen: cannot serve on"):
            service.start()


def test_privacy_spent_and_budget_are_exported(tmp_path):
    """With [privacy] on: epsilon as the accountant has it, delta, and the budget."""
    from aggregator.config import PrivacyConfig
    from aggregator.service import AggregatorService
    from edge_agent.config import BrokerConfig

    cfg = config("dp", BrokerConfig(), tmp_path, listen="127.0.0.1:0")
    cfg.round.agents_per_round = 2
    cfg.privacy = PrivacyConfig(mode="central", noise_multiplier=1.0, population=10, budget=5.0)
    loop = Loop()
    service = AggregatorService(cfg, loop)
    service.start()  # the endpoint; the connection would open once the loop runs (it never does here)
    try:
        host, port = service.metrics_address
        assert port != 0  # port 0: the system's choice, reported back
        s = scrape((host, port))
        assert (value(s, "fedmqtt_dp_epsilon"), value(s, "fedmqtt_dp_delta"), value(s, "fedmqtt_dp_epsilon_budget")) \
            == (0.0, 1e-5, 5.0)
        privacy = service.coordinator.privacy
        privacy.charge(0.2)
        privacy.charge(0.2)
        service._execute([])  # what the service runs after every message and tick
        assert value(scrape((host, port)), "fedmqtt_dp_epsilon") == privacy.accountant.epsilon() > 0
    finally:
        service.close()


def test_prometheus_client_is_imported_only_when_the_endpoint_is_on():
    script = ("import sys\n"
              "from aggregator.config import AggregatorConfig\n"
              "from aggregator.service import AggregatorService\n"
              "from edge_agent.mqtt import Loop\n"
              "import tempfile\n"
              "AggregatorService(AggregatorConfig(state_dir=tempfile.mkdtemp()), Loop())\n"
              "print('prometheus_client' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


@pytest.mark.parametrize("reason, caps, code", [
    ("battery at 18%, below 30%", ["softmax"], "battery_low"),
    ("not on mains power", ["softmax"], "not_on_mains"),
    ("CPU load 1.50 per core, above 0.80", ["softmax"], "cpu_load"),
    ("outside the training window 22:00-06:00", ["softmax"], "outside_window"),
    ("bad_params: training returned NaN", ["softmax"], "bad_params"),
    ("", ["linear"], "unsupported_model"),
    ("", ["softmax"], "unspecified"),
    ("the cat sat on it", ["softmax"], "other"),
])
def test_not_eligible_reason_codes(reason, caps, code):
    from aggregator.prometheus import reason_code

    assert reason_code(AgentInfo(online=True, eligible=False, num_samples=1, capabilities=caps, reason=reason),
                       "softmax") == code
