"""Site hierarchy (issue 14 item 1): site brokers bridged to a cloud broker, site aggregators below a cloud one.

Real mosquitto processes on loopback: a cloud broker and one site broker per
site, each site broker bridged to the cloud with mosquitto's own bridge
(aggregator.site.bridge_config). The reference is the flat federation of
the same agents computed without MQTT (conftest.offline_fedavg).
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from aggregator.broker import LocalBroker
from aggregator.config import AggregatorConfig, ModelConfig, RoundConfig, SiteConfig, TrainingConfig
from aggregator.coordinator import RoundClosed
from aggregator.datasets import federated_digits
from aggregator.sim import Simulation
from aggregator.site import SiteAggregator, bridge_config
from edge_agent import wire
from edge_agent.config import BrokerConfig, ConfigError, load
from edge_agent.mqtt import Loop

from .conftest import WAIT_S, offline_fedavg

SEED = 5


class RunningSite:
    """A SiteAggregator on its own loop thread."""

    def __init__(self, cfg: AggregatorConfig) -> None:
        self.loop = Loop()
        self.rounds: "queue.Queue[RoundClosed]" = queue.Queue()
        self.finished = threading.Event()
        self.site = SiteAggregator(cfg, self.loop, on_round=self.rounds.put,
                                   on_finished=lambda f: self.finished.set())
        self.site.start()
        self.loop.start(name=f"test-site-{cfg.site.id}")

    def stop(self) -> None:
        self.loop.stop()
        if self.loop.thread is not None:
            self.loop.thread.join(10)


@pytest.fixture
def hierarchy(tmp_path: Path, fed: str):
    """start(n_sites) -> (cloud broker, [site brokers]); everything started is stopped after the test."""
    brokers: list[LocalBroker] = []
    cleanup: list = []

    def start(n_sites: int):
        cloud = LocalBroker(workdir=tmp_path / "broker-cloud").start()
        brokers.append(cloud)
        sites = []
        for i in range(n_sites):
            sid = f"site-{'ab'[i]}"
            b = LocalBroker(workdir=tmp_path / f"broker-{sid}", extra=bridge_config(sid, fed, cloud.address)).start()
            brokers.append(b)
            sites.append(b)
        return cloud, sites

    yield start, cleanup
    for stop in reversed(cleanup):
        stop()
    for b in reversed(brokers):
        b.close()


def _cloud_config(fed, cloud: LocalBroker, tmp_path, rounds: int, n_sites: int, **round_kw) -> AggregatorConfig:
    round_kw.setdefault("timeout", WAIT_S)
    return AggregatorConfig(
        federation=fed, role="cloud", rounds=rounds, state_dir=str(tmp_path / "state-cloud"),
        model=ModelConfig(kind="softmax", n_features=64, n_outputs=10),
        training=TrainingConfig(epochs=2, batch_size=16, lr=0.1),
        round=RoundConfig(min_agents=n_sites, quorum=1, **round_kw),
        broker=BrokerConfig(host=cloud.host, port=cloud.port),
    )


def _site_config(fed, broker: LocalBroker, tmp_path, site_id: str, n_agents: int, **site_kw) -> AggregatorConfig:
    return AggregatorConfig(
        federation=fed, role="site", state_dir=str(tmp_path / f"state-{site_id}"),
        model=ModelConfig(kind="softmax", n_features=64, n_outputs=10),
        round=RoundConfig(min_agents=n_agents, quorum=1, timeout=WAIT_S),
        site=SiteConfig(id=site_id, **site_kw),
        broker=BrokerConfig(host=broker.host, port=broker.port),
    )


def _sim(broker: LocalBroker, fed: str, data, indices, **kw) -> Simulation:
    sim = Simulation(BrokerConfig(host=broker.host, port=broker.port), fed, [data.agents[i] for i in indices],
                     seed=SEED, indices=indices, **kw)
    sim.start()
    return sim


def test_two_sites_over_bridges_equal_the_flat_federation(fed, tmp_path, hierarchy, start_aggregator):
    start, cleanup = hierarchy
    cloud_broker, (site_a, site_b) = start(2)
    data = federated_digits(6, "dirichlet", 0.5, SEED, holdout=0.1)
    cloud_cfg = _cloud_config(fed, cloud_broker, tmp_path, rounds=3, n_sites=2)
    cloud = start_aggregator(cloud_cfg)
    sites = [RunningSite(_site_config(fed, site_a, tmp_path, "site-a", 3)),
             RunningSite(_site_config(fed, site_b, tmp_path, "site-b", 3))]
    cleanup += [s.stop for s in sites]
    sims = [_sim(site_a, fed, data, range(0, 3)), _sim(site_b, fed, data, range(3, 6))]
    cleanup += [s.stop for s in sims]

    cloud.wait_finished(WAIT_S * 2)
    expected = offline_fedavg(data.agents, cloud_cfg, SEED, 3)
    got = cloud.coordinator.params
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], atol=1e-6, rtol=1e-5)
    summaries = [cloud.rounds.get_nowait().summary for _ in range(3)]
    assert [(s.selected, s.participants) for s in summaries] == [(2, 2)] * 3
    assert all(s.metrics["dropouts"] == 0 for s in summaries)
    assert "eval_accuracy" in summaries[-1].metrics and "train_loss" in summaries[-1].metrics
    assert not cloud.coordinator.rejected
    # Down the bridge: each site ends on the cloud's final model, and so do its agents.
    for s, sim in zip(sites, sims):
        assert s.finished.wait(WAIT_S), "the site did not see the cloud finish"
        assert sim.finished.wait(WAIT_S), "the site's agents did not see the federation finish"
        assert s.site.coordinator.version == cloud.coordinator.version
        assert [ev.summary.participants for ev in _drain(s.rounds)] == [3, 3, 3]
        for runner in sim.runners:
            assert runner.core.model_msg.version == cloud.coordinator.version
            assert runner.core.model_msg.run == cloud.coordinator.run


def test_a_cloud_federates_a_site_and_directly_attached_devices_at_once(fed, tmp_path, hierarchy, start_aggregator):
    # Two mosquitto processes and one bridge: site-a's three devices behind it, two devices on the cloud broker.
    start, cleanup = hierarchy
    cloud_broker, (site_a,) = start(1)
    data = federated_digits(5, "dirichlet", 0.5, SEED)
    cloud_cfg = _cloud_config(fed, cloud_broker, tmp_path, rounds=2, n_sites=3)
    cloud = start_aggregator(cloud_cfg)
    site = RunningSite(_site_config(fed, site_a, tmp_path, "site-a", 3))
    cleanup.append(site.stop)
    sims = [_sim(site_a, fed, data, range(0, 3)), _sim(cloud_broker, fed, data, range(3, 5))]
    cleanup += [s.stop for s in sims]

    cloud.wait_finished(WAIT_S * 2)
    expected = offline_fedavg(data.agents, cloud_cfg, SEED, 2)
    for k in expected:
        np.testing.assert_allclose(cloud.coordinator.params[k], expected[k], atol=1e-6, rtol=1e-5)
    assert [cloud.rounds.get_nowait().summary.participants for _ in range(2)] == [3, 3]


def test_a_server_optimizer_at_the_cloud_equals_the_flat_federation(fed, tmp_path, hierarchy, start_aggregator,
                                                                     broker):
    # The reference is a flat federation of the same four devices over the session's broker.
    data = federated_digits(4, "dirichlet", 0.5, SEED)
    flat_cfg = AggregatorConfig(
        federation=f"{fed}-flat", rounds=2, state_dir=str(tmp_path / "state-flat"),
        model=ModelConfig(kind="softmax", n_features=64, n_outputs=10),
        training=TrainingConfig(epochs=2, batch_size=16, lr=0.1),
        round=RoundConfig(min_agents=4, quorum=1, timeout=WAIT_S),
        broker=BrokerConfig(host=broker.host, port=broker.port),
    )
    flat_cfg.strategy.name = "fedadam"
    flat = start_aggregator(flat_cfg)
    flat_sim = Simulation(BrokerConfig(host=broker.host, port=broker.port), flat_cfg.federation, data.agents,
                          seed=SEED)
    flat_sim.start()
    start, cleanup = hierarchy
    cleanup.append(flat_sim.stop)
    cloud_broker, (site_a, site_b) = start(2)
    cloud_cfg = _cloud_config(fed, cloud_broker, tmp_path, rounds=2, n_sites=2)
    cloud_cfg.strategy.name = "fedadam"
    cloud = start_aggregator(cloud_cfg)
    sites = [RunningSite(_site_config(fed, site_a, tmp_path, "site-a", 2)),
             RunningSite(_site_config(fed, site_b, tmp_path, "site-b", 2))]
    cleanup += [s.stop for s in sites]
    sims = [_sim(site_a, fed, data, [0, 1]), _sim(site_b, fed, data, [2, 3])]
    cleanup += [s.stop for s in sims]

    flat.wait_finished(WAIT_S)
    cloud.wait_finished(WAIT_S * 2)
    for k, v in flat.coordinator.params.items():
        np.testing.assert_allclose(cloud.coordinator.params[k], v, atol=1e-6, rtol=1e-5)
    assert not np.allclose(flat.coordinator.params["W0"], offline_fedavg(data.agents, flat_cfg, SEED, 2)["W0"],
                           atol=1e-4)  # (FedAdam really is another rule than FedAvg here)


def _drain(q: queue.Queue) -> list:
    out = []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out


def test_a_site_that_cannot_answer_in_time_is_a_dropout_at_the_cloud(fed, tmp_path, hierarchy, start_aggregator):
    start, cleanup = hierarchy
    cloud_broker, (site_a, site_b) = start(2)
    data = federated_digits(4, "dirichlet", 0.5, SEED)
    cloud_cfg = _cloud_config(fed, cloud_broker, tmp_path, rounds=1, n_sites=2, timeout=6.0)
    cloud = start_aggregator(cloud_cfg)
    sites = [RunningSite(_site_config(fed, site_a, tmp_path, "site-a", 2, upload_margin=2.0)),
             RunningSite(_site_config(fed, site_b, tmp_path, "site-b", 2, upload_margin=2.0))]
    cleanup += [s.stop for s in sites]
    # site-b's devices are far slower than the cloud's round: its local round
    # ends empty before the cloud's deadline and the site sends nothing.
    sims = [_sim(site_a, fed, data, [0, 1]), _sim(site_b, fed, data, [2, 3], train_delay=60.0)]
    cleanup += [s.stop for s in sims]

    cloud.wait_finished(WAIT_S)
    s = cloud.rounds.get_nowait().summary
    assert (s.selected, s.participants, s.metrics["dropouts"]) == (2, 1, 1.0)
    expected = offline_fedavg([data.agents[0], data.agents[1]], cloud_cfg, SEED, 1)
    for k in expected:
        np.testing.assert_allclose(cloud.coordinator.params[k], expected[k], atol=1e-6, rtol=1e-5)


def test_a_site_restarted_mid_round_keeps_the_updates_it_acknowledged(fed, tmp_path, hierarchy, start_aggregator):
    start, cleanup = hierarchy
    cloud_broker, (site_a,) = start(1)
    data = federated_digits(3, "dirichlet", 0.5, SEED)
    cloud_cfg = _cloud_config(fed, cloud_broker, tmp_path, rounds=1, n_sites=1)
    cloud = start_aggregator(cloud_cfg)
    site_cfg = _site_config(fed, site_a, tmp_path, "site-a", 3)
    first = RunningSite(site_cfg)
    cleanup.append(first.stop)
    # Two quick devices and a slow one: the site goes down holding two acknowledged updates.
    sims = [_sim(site_a, fed, data, [0, 1]), _sim(site_a, fed, data, [2], train_delay=4.0)]
    cleanup += [s.stop for s in sims]
    end = time.monotonic() + WAIT_S
    while time.monotonic() < end:
        o = first.site.coordinator.open
        if o is not None and len(o.received) == 2:
            break
        time.sleep(0.02)
    else:
        raise AssertionError("the site never held two local updates")
    first.stop()
    assert cloud.coordinator.round == 0
    second = RunningSite(site_cfg)  # same state_dir: checkpoint, journal, upstream outbox
    cleanup.append(second.stop)

    cloud.wait_finished(WAIT_S)
    (ev,) = _drain(second.rounds)
    assert ev.summary.participants == 3  # two from the journal, the slow one after the restart
    expected = offline_fedavg(data.agents, cloud_cfg, SEED, 1)
    for k in expected:
        np.testing.assert_allclose(cloud.coordinator.params[k], expected[k], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------
# what a hierarchy refuses (each message names the key)


@pytest.mark.parametrize("overrides, key", [
    ({"role": "site"}, "site.id"),
    ({"role": "site", "site.id": "site-a", "strategy.name": "fedadam"}, "strategy.name"),
    ({"role": "site", "site.id": "site-a", "strategy.name": "fedavgm"}, "strategy.name"),
    ({"role": "site", "site.id": "site-a", "strategy.name": "median"}, "strategy.name"),
    ({"role": "site", "site.id": "site-a", "strategy.name": "krum"}, "strategy.name"),
    ({"role": "site", "site.id": "site-a", "strategy.name": "fedavg_unweighted"}, "strategy.name"),
    ({"role": "site", "site.id": "site-a", "privacy.mode": "central", "round.agents_per_round": "2"}, "privacy.mode"),
    ({"role": "cloud", "privacy.mode": "central", "round.agents_per_round": "2"}, "privacy.mode"),
    ({"role": "site", "site.id": "site-a", "secagg.mode": "secagg"}, "secagg.mode"),
    ({"role": "cloud", "secagg.mode": "secagg+"}, "secagg.mode"),
    ({"role": "cloud", "round.mode": "async"}, "round.mode"),
    ({"role": "site", "site.id": "site-a", "round.mode": "async"}, "round.mode"),
    ({"role": "site", "site.id": "site-a", "compression.mode": "q8"}, "compression.mode"),
    ({"role": "cloud", "strategy.clip_norm": "1.0"}, "strategy.clip_norm"),
    ({"role": "edge"}, "role"),
    ({"role": "site", "site.id": "site/a"}, "site.id"),
    ({"role": "site", "site.id": "site-a", "site.upstream_prefix": "a/+/b"}, "site.upstream_prefix"),
    ({"role": "site", "site.id": "site-a", "site.upload_margin": "-1"}, "site.upload_margin"),
    ({"role": "site", "site.id": "site-a", "site.password_file": "/nonexistent"}, "site.password_file"),
])
def test_hierarchy_refusals_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        load(AggregatorConfig, None, overrides)
    assert str(info.value).startswith(f"{key}: "), str(info.value)


def test_what_a_hierarchy_allows():
    load(AggregatorConfig, None, {"role": "site", "site.id": "site-a", "strategy.clip_norm": "2.0"})
    for name in ("fedavg", "fedprox", "fedavgm", "fedadam", "median", "krum"):
        kw = {"strategy.prox_mu": "0.1"} if name == "fedprox" else {}
        load(AggregatorConfig, None, {"role": "cloud", "strategy.name": name, **kw})


def test_robust_rules_at_the_cloud_are_allowed_with_a_warning():
    from aggregator.site import cloud_warnings

    assert "not against single devices" in cloud_warnings(load(AggregatorConfig, None,
                                                                {"role": "cloud", "strategy.name": "median"}))[0]
    assert cloud_warnings(load(AggregatorConfig, None, {"role": "cloud", "strategy.name": "fedadam"})) == []


def test_a_site_aggregator_built_in_python_is_checked_too(tmp_path):
    cfg = AggregatorConfig(role="site", state_dir=str(tmp_path), site=SiteConfig(id="site-a"))
    cfg.strategy.name = "trimmed_mean"
    with pytest.raises(ConfigError, match=r"^strategy\.name: "):
        SiteAggregator(cfg, Loop())


def test_the_upstream_connection_can_log_in_as_another_user(tmp_path):
    from aggregator.site import upstream_broker

    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    cfg = load(AggregatorConfig, None, {"role": "site", "site.id": "site-a", "broker.username": "site-agg",
                                        "broker.password": "x", "site.username": "site-a-up",
                                        "site.password_file": str(secret)})
    up = upstream_broker(cfg)
    assert (up.username, up.secret(), up.host) == ("site-a-up", "s3cret", cfg.broker.host)
    assert upstream_broker(load(AggregatorConfig, None, {"role": "site", "site.id": "site-a"})) == cfg.broker.__class__()


def test_a_site_refuses_a_cloud_task_it_cannot_answer():
    from aggregator.site import unsupported_task

    base = dict(fed="f", round=1, base="v")
    assert unsupported_task(wire.TaskMsg(**base)) == ""
    assert "asynchronous" in unsupported_task(wire.TaskMsg(**base, mode="async"))
    assert "differential privacy" in unsupported_task(wire.TaskMsg(**base, config=wire.TrainConfig(
        clip_norm=1.0, noise_std=0.5, dp_mode="local")))


def test_bridge_config_maps_only_the_sites_topics():
    text = bridge_config("site-a", "plant", "cloud.example:8883", options=("remote_username site-a",))
    lines = text.splitlines()
    assert lines[0] == "connection fedmqtt-cloud" and "address cloud.example:8883" in lines
    assert "remote_username site-a" in lines
    topics = [line for line in lines if line.startswith("topic ")]
    assert "topic update/site-a out 1 cloud/fl/plant/ fl/plant/" in topics
    assert "topic agent/site-a/selected in 1 cloud/fl/plant/ fl/plant/" in topics
    assert not any("+" in t.split()[1] and "chunk" not in t for t in topics)  # no other participant's topics
    with pytest.raises(ValueError):
        bridge_config("site/a", "plant", "h:1")


def test_the_shipped_bridge_example_carries_the_same_topics():
    example = (Path(__file__).resolve().parents[1] / "deploy" / "mosquitto" / "site-bridge.conf").read_text()
    shipped = [line for line in example.splitlines() if line.startswith("topic ")]
    generated = [line for line in bridge_config("SITE", "FED", "CLOUD").splitlines() if line.startswith("topic ")]
    assert shipped == generated
