"""Update compression over a real mosquitto: q8 and topk federations complete their rounds with smaller updates."""

from __future__ import annotations

import queue

import msgpack
import pytest

from aggregator.config import AggregatorConfig, CompressionConfig, ModelConfig, RoundConfig, TrainingConfig
from aggregator.datasets import federated_digits
from aggregator.sim import Simulation
from edge_agent import wire
from edge_agent.models import BuiltinModel
from edge_agent.topics import Topics

from .conftest import WAIT_S

pytestmark = pytest.mark.broker

AGENTS = 5
ROUNDS = 3


def _run(fed: str, mode: str, broker_config, tmp_path, start_aggregator, raw_client, data) -> tuple[dict, list[bytes]]:
    """One federation of AGENTS digits agents for ROUNDS rounds; returns (final test metrics, update payloads seen)."""
    cfg = AggregatorConfig(
        federation=fed, rounds=ROUNDS, state_dir=str(tmp_path / f"state-{mode}"),
        model=ModelConfig(kind="softmax", n_features=64, n_outputs=10),
        training=TrainingConfig(epochs=2, batch_size=16, lr=0.1),
        round=RoundConfig(min_agents=AGENTS, quorum=1, timeout=WAIT_S),
        compression=CompressionConfig(mode=mode, topk_fraction=0.1),
        broker=broker_config,
    )
    model = BuiltinModel(cfg.model.spec())
    spy = raw_client()
    spy.subscribe(Topics(fed).updates)
    ra = start_aggregator(cfg, evaluate=lambda p: model.evaluate(p, data.X_test, data.y_test))
    sim = Simulation(broker_config, fed, data.agents, seed=1)
    sim.start()
    try:
        ra.wait_finished(timeout=3 * WAIT_S)
    finally:
        sim.stop()
    summaries = [ra.rounds.get_nowait().summary for _ in range(ROUNDS)]
    assert [s.participants for s in summaries] == [AGENTS] * ROUNDS
    assert not ra.coordinator.rejected, ra.coordinator.rejected
    payloads = []
    while True:
        try:
            topic, payload, _ = spy.messages.get(timeout=0.5 if payloads else WAIT_S)
        except queue.Empty:
            break
        if Topics(fed).parse(topic)[0] == "update":
            payloads.append(payload)
    assert len(payloads) == AGENTS * ROUNDS
    return summaries[-1].metrics, payloads


def test_q8_and_topk_federations_complete_rounds_with_smaller_updates(fed, broker_config, tmp_path,
                                                                       start_aggregator, raw_client):
    data = federated_digits(AGENTS, "dirichlet", 0.5, 4)
    results = {mode: _run(f"{fed}-{mode}", mode, broker_config, tmp_path, start_aggregator, raw_client, data)
               for mode in ("none", "q8", "topk")}
    plain = sum(map(len, results["none"][1])) / len(results["none"][1])
    spec = ModelConfig(kind="softmax", n_features=64, n_outputs=10).spec()
    for mode in ("q8", "topk"):
        metrics, payloads = results[mode]
        for p in payloads:
            raw = msgpack.unpackb(p)
            assert {t["codec"] for t in raw["delta"].values()} == {mode}
            msg = wire.decode(p, expect="update", spec=spec)  # what the aggregator accepted
            # the same update sent dense, with the same metrics: the saving of this very message
            dense = wire.encode(wire.UpdateMsg(msg.fed, msg.round, msg.agent, msg.base, msg.num_samples,
                                               {k: v.copy() for k, v in msg.delta.items()}, msg.metrics))
            assert len(p) < 0.4 * len(dense), (mode, len(p), len(dense))
        mean = sum(map(len, payloads)) / len(payloads)
        assert mean < 0.4 * plain, (mode, mean, plain)
        # it still learns: well above chance (0.1) after three rounds
        assert metrics["test_accuracy"] > 0.5, (mode, metrics)
    # q8 is unbiased and loses little against the same federation uncompressed
    assert results["q8"][0]["test_accuracy"] > results["none"][0]["test_accuracy"] - 0.1
