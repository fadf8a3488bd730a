"""Big models in chunks over a real mosquitto whose packet limit is 1 MiB (docs/PROTOCOL.md §8).

A 10M-parameter model (40 MB of float32) goes down to two agents as a
retained manifest plus retained chunks, their updates come back as manifests
plus chunks, and the round gives exactly what the same round computes
without any MQTT. A hostile client's corrupt chunk, and a manifest whose
chunks never come, are counted rejections that change nothing.
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import time

import numpy as np
import pytest

from aggregator import checkpoint
from aggregator.broker import LocalBroker
from aggregator.config import AggregatorConfig, ModelConfig, RoundConfig, TrainingConfig
from aggregator.journal import JournalFile
from aggregator.sim import Simulation
from edge_agent import chunking, wire
from edge_agent.config import BrokerConfig
from edge_agent.data import LocalData
from edge_agent.topics import Topics

from .conftest import WAIT_S, RawClient, offline_fedavg

pytestmark = pytest.mark.broker

LIMIT = 1024 * 1024


@pytest.fixture(scope="module")
def small_broker():
    with LocalBroker(overrides={"max_packet_size": str(LIMIT)}) as b:
        yield b


@pytest.fixture
def small_client(small_broker):
    """Plain paho clients of the 1 MiB broker."""
    clients: list[RawClient] = []

    def make(client_id: str = "") -> RawClient:
        clients.append(RawClient(small_broker, client_id))
        return clients[-1]

    yield make
    for c in clients:
        c.close()


def _data(seed: int, rows: int = 16, features: int = 1000) -> LocalData:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, features)).astype(np.float32)
    y = np.arange(rows) % 10
    return LocalData(X, y, np.zeros((0, features), np.float32), np.zeros(0, np.int64))


def test_a_10m_parameter_model_through_a_1_mib_packet_limit(small_broker, fed, tmp_path, start_aggregator,
                                                            small_client):
    seed = 3
    bc = BrokerConfig(host=small_broker.host, port=small_broker.port)
    cfg = AggregatorConfig(
        federation=fed, rounds=1, state_dir=str(tmp_path / "state"),
        # 1000*10000 + 10000 + 10000*10 + 10 = 10,110,010 parameters: 40.4 MB, 39 chunks
        model=ModelConfig(kind="mlp", n_features=1000, n_outputs=10, hidden=[10_000]),
        training=TrainingConfig(epochs=1, batch_size=16, lr=0.05),
        round=RoundConfig(min_agents=2, quorum=2, timeout=WAIT_S * 2), broker=bc,
    )
    cfg.onnx.every = 0
    assert cfg.model.spec().num_params() == 10_110_010
    datas = [_data(0), _data(1)]
    t0 = time.monotonic()
    ra = start_aggregator(cfg)
    sim = Simulation(bc, fed, datas, seed=seed)
    sim.start()
    try:
        ra.wait_finished(WAIT_S * 2)
        assert sim.finished.wait(WAIT_S), "agents did not see the federation finish"
        cores = [r.core for r in sim.runners]
        end = time.monotonic() + WAIT_S  # the round-1 model reaches the agents in chunks too
        while time.monotonic() < end and not all(c.model_msg is not None and c.model_msg.round == 1 for c in cores):
            time.sleep(0.1)
    finally:
        sim.stop()
    elapsed = time.monotonic() - t0
    expected = offline_fedavg(datas, cfg, seed, 1)
    got = ra.coordinator.params
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], atol=1e-6, rtol=0)
    assert not ra.coordinator.rejected, ra.coordinator.rejected
    assert [ra.rounds.get_nowait().summary.participants] == [2]
    for c in cores:  # the agents hold the new model, fetched from its retained chunks
        assert c.model_msg.round == 1 and c.model_msg.version == ra.coordinator.version
        assert c.model_chunks is None or c.model_chunks.manifest is None  # nothing left buffered
        assert not c.rejected, c.rejected
    assert all(r._outgoing is not None and r._outgoing.done for r in sim.runners)  # noqa: SLF001
    # A late joiner finds the manifest retained on `model`, and every chunk retained beside it.
    late = small_client()
    late.subscribe(Topics(fed).model)
    payload, retained = late.wait_for(Topics(fed).model)
    m = chunking.decode_manifest(payload, fed=fed)
    assert retained and m.of == "model" and m.size > 40_000_000 and m.count == 39 and m.round == 1
    late.subscribe(f"fl/{fed}/model/chunk/+")
    r = chunking.Reassembler()
    r.begin(m)
    whole = None
    while whole is None:
        t, data = late.messages.get(timeout=WAIT_S)[:2]
        if Topics(fed).parse_chunk(t)[0] == "model_chunk":
            whole = r.add(chunking.decode_chunk(data, fed=fed))
    model = wire.decode(whole, expect="model", fed=fed, max_bytes=len(whole))
    assert model.version == ra.coordinator.version
    print(f"10M-parameter round through a 1 MiB limit: {elapsed:.1f} s")
    assert elapsed < 90


def test_corrupt_and_missing_chunks_are_counted_rejections_that_change_nothing(small_broker, fed, tmp_path,
                                                                               start_aggregator, small_client):
    bc = BrokerConfig(host=small_broker.host, port=small_broker.port)
    cfg = AggregatorConfig(
        federation=fed, rounds=1, state_dir=str(tmp_path / "state"),
        model=ModelConfig(kind="linear", n_features=1, n_outputs=1),
        round=RoundConfig(min_agents=1, quorum=1, timeout=WAIT_S), broker=bc,
    )
    cfg.onnx.every = 0
    ra = start_aggregator(cfg)
    ra.service.chunk_timeout = 1.0  # the round's timeout in production
    topics = Topics(fed)
    evil = small_client("evil")
    evil.subscribe(topics.task)
    evil.publish(topics.status("evil"), wire.encode(wire.StatusMsg(fed, 0, "evil", "online", 5, ["linear"])),
                 retain=True)
    task = evil.wait_for_open_task(topics.task)
    version, params = ra.coordinator.version, {k: v.copy() for k, v in ra.coordinator.params.items()}
    # A real update's payload, chunked, with one chunk's bytes flipped.
    upd = wire.encode(wire.UpdateMsg(fed, task.round, "evil", task.base, 5,
                                     {"W0": np.ones((1, 1), np.float32), "b0": np.ones(1, np.float32)}, {}))
    m, pieces = chunking.split(upd, 20, fed=fed, round=task.round, of="update")
    evil.publish(topics.update_chunks("evil"), chunking.encode_manifest(m))
    bad = bytearray(pieces[1])
    bad[0] ^= 0xFF
    for i, piece in enumerate(pieces):
        data = bytes(bad) if i == 1 else bytes(piece)
        evil.publish(topics.update_chunks("evil"), chunking.encode_chunk(chunking.Chunk(fed, task.round, m.sha256, i,
                                                                                        data)))
    # a chunk of a payload nobody announced
    evil.publish(topics.update_chunks("evil"), chunking.encode_chunk(chunking.Chunk(fed, 1, b"\1" * 32, 0, b"x")))
    end = time.monotonic() + WAIT_S
    rej = ra.coordinator.rejected
    while time.monotonic() < end and not (rej["chunk_hash_mismatch"] and rej["chunk_without_manifest"]):
        time.sleep(0.05)
    assert rej["chunk_hash_mismatch"] == 1 and rej["chunk_without_manifest"] == 1
    # the payload still lacks chunk 1: at its deadline it is dropped as incomplete
    end = time.monotonic() + WAIT_S
    while time.monotonic() < end and not rej["chunk_incomplete"]:
        time.sleep(0.05)
    assert rej["chunk_incomplete"] == 1
    assert "evil" not in ra.service.assemblies and not ra.service._held_acks  # noqa: SLF001
    o = ra.coordinator.open
    assert o is not None and not o.received and ra.coordinator.round == 0 and ra.coordinator.version == version
    for k, v in params.items():
        np.testing.assert_array_equal(ra.coordinator.params[k], v)
    # The same payload with its genuine chunk 1 is the update it always was: accepted.
    evil.publish(topics.update_chunks("evil"), chunking.encode_manifest(m))
    for i, piece in enumerate(pieces):
        evil.publish(topics.update_chunks("evil"),
                     chunking.encode_chunk(chunking.Chunk(fed, task.round, m.sha256, i, bytes(piece))))
    ra.wait_finished()
    assert ra.coordinator.round == 1
    np.testing.assert_allclose(ra.coordinator.params["W0"], [[1.0]])
    assert hashlib.sha256(upd).digest() == m.sha256
    evil.publish(topics.status("evil"), b"", retain=True)


def test_kill_9_of_the_aggregator_mid_payload_loses_no_chunk_it_was_sent(fed, broker, tmp_path, raw_client):
    """The device sends the manifest and all chunks but the last; the aggregator is killed; the device sends the last.

    The aggregator acknowledges a payload's messages only once the whole
    update is journaled, so at the kill they are still the broker's to deliver
    again: the restarted aggregator gets them from its session, the device
    never sends them twice, and the round closes on exactly that update.
    """
    from .test_durability import linear_toml, start_aggregator_process

    state = tmp_path / "state"
    toml = linear_toml(tmp_path / "agg.toml", fed, state, rounds=1, min_agents=1, quorum=1)
    topics = Topics(fed)
    dev = raw_client("dev-0")
    dev.subscribe(topics.task)
    agg = start_aggregator_process(toml, broker)
    try:
        dev.publish(topics.status("dev-0"), wire.encode(wire.StatusMsg(fed, 0, "dev-0", "online", 3, ["linear"])),
                    retain=True)
        task = dev.wait_for_open_task(topics.task)
        upd = wire.encode(wire.UpdateMsg(fed, task.round, "dev-0", task.base, 3,
                                         {"W0": np.full((1, 1), 2.5, np.float32), "b0": np.full(1, -1.5, np.float32)},
                                         {}))
        m, pieces = chunking.split(upd, 16, fed=fed, round=task.round, of="update")
        assert m.count >= 4
        messages = [chunking.encode_manifest(m)] + [
            chunking.encode_chunk(chunking.Chunk(fed, task.round, m.sha256, i, bytes(p))) for i, p in enumerate(pieces)]
        for payload in messages[:-1]:
            dev.publish(topics.update_chunks("dev-0"), payload)
        time.sleep(1.0)  # the aggregator holds them, unacknowledged
        agg.send_signal(signal.SIGKILL)
        agg.wait(10)
        # nothing of the payload was journaled (it never completed) and nothing of it was acknowledged
        assert all(r["type"] != "update" for r in JournalFile(state).load())
        dev.publish(topics.update_chunks("dev-0"), messages[-1])  # while no aggregator is connected
        agg = start_aggregator_process(toml, broker)
        try:
            out, _ = agg.communicate(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            agg.kill()
            out, _ = agg.communicate()
            raise AssertionError(f"the restarted aggregator did not finish:\n{out}") from None
        assert agg.returncode == 0, out
    finally:
        if agg.poll() is None:
            agg.kill()
        dev.publish(topics.status("dev-0"), b"", retain=True)
    final = checkpoint.load(state)
    assert final["round"] == 1
    params = final["params"]
    np.testing.assert_array_equal(params["W0"], [[2.5]])
    np.testing.assert_array_equal(params["b0"], [-1.5])
