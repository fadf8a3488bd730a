"""Replay protection (issue 10, item 7): run ids, the order agents accept models and tasks in.

The aggregator stamps every model and task with its federation run (the
millisecond its state was created); agents refuse a model or task older than
the newest they accepted, and keep that across restarts.
"""

from __future__ import annotations

import pytest

from aggregator import checkpoint
from aggregator.config import AggregatorConfig, ModelConfig, OnnxConfig
from aggregator.coordinator import Coordinator, SaveCheckpoint, run_id
from aggregator.service import AggregatorService
from aggregator.strategies import FedAvg
from edge_agent import wire
from edge_agent.mqtt import Loop

from .test_coordinator import T, config, published, started, status, update

RUN = 1_700_000_000_000


# -- the aggregator: run ids ----------------------------------------------------------


def _run_of(actions, topic: str) -> list[int]:
    return [wire.decode(p.payload).run for p in published(actions, topic)]


def test_every_model_and_task_carries_the_run_id():
    c = Coordinator(config(min_agents=1, rounds=1, timeout=5.0), FedAvg(), run=RUN)
    actions = c.start(0.0)
    assert _run_of(actions, T.model) == [RUN] and _run_of(actions, T.task) == [RUN]  # waiting
    assert wire.decode(published(actions, T.task)[0].payload).state == "waiting"
    actions = c.receive(*status("a0"), now=0.0)
    assert _run_of(actions, T.task) == [RUN]  # open
    actions = c.receive(*update(c, "a0", [1, 1]), now=1.0)
    (done,) = published(actions, T.task)
    assert _run_of(actions, T.model) == [RUN] and wire.decode(done.payload).state == "done"
    assert wire.decode(done.payload).run == RUN


def test_a_done_task_carries_the_attempt_that_would_open_next():
    # Agents order a done task where the next waiting task would stand, so it
    # names that attempt, as a waiting task does: 0 after a close, more when
    # the privacy budget ends a round that was abandoned before.
    c = started(n_agents=1, min_agents=1, rounds=1)
    c.tick(100.0)  # round 1 attempt 0 abandoned, attempt 1 opens
    assert (c.open.round, c.open.attempt) == (1, 1)
    (done,) = published(c.receive(*update(c, "a0", [1, 1]), now=101.0), T.task)
    done = wire.decode(done.payload)
    assert (done.state, done.round, done.attempt) == ("done", 1, 0)
    c.attempt = 3
    done = wire.decode(c._task_done().payload)
    assert (done.round, done.attempt) == (1, 3)


def test_the_run_id_survives_checkpoint_and_restore():
    c = Coordinator(config(min_agents=1), FedAvg(), run=RUN)
    first = c.start(0.0)
    # the new run id is made durable before any message carries it
    assert isinstance(first[0], SaveCheckpoint) and first[0].state["run"] == RUN
    c.receive(*status("a0"), now=0.0)
    ck = next(a for a in c.receive(*update(c, "a0", [1, 1]), now=1.0) if isinstance(a, SaveCheckpoint))
    assert ck.state["run"] == RUN
    resumed = Coordinator(config(min_agents=1), FedAvg(), state=ck.state, run=RUN + 5_000)
    assert resumed.run == RUN
    actions = resumed.start(2.0)
    assert not any(isinstance(a, SaveCheckpoint) for a in actions)  # nothing new to save
    assert _run_of(actions, T.model) == [RUN] and set(_run_of(actions, T.task)) == {RUN}


def test_a_checkpoint_older_than_run_ids_takes_a_new_one_and_saves_it():
    c = started(n_agents=1, min_agents=1)
    ck = next(a for a in c.receive(*update(c, "a0", [1, 1]), now=1.0) if isinstance(a, SaveCheckpoint)).state
    del ck["run"]
    resumed = Coordinator(config(min_agents=1), FedAvg(), state=ck, run=RUN)
    actions = resumed.start(2.0)
    assert resumed.run == RUN and resumed.round == 1
    assert isinstance(actions[0], SaveCheckpoint) and actions[0].state["run"] == RUN
    assert _run_of(actions, T.model) == [RUN]


def test_a_fresh_state_with_a_journal_to_replay_keeps_the_journal():
    # Saving a checkpoint resets the journal; with records to replay that
    # would lose accepted updates, so the run id waits for the next close.
    c = Coordinator(config(min_agents=1), FedAvg(), run=RUN)
    c.start(0.0)
    journal = [a.record for a in c.receive(*status("a0"), now=0.0) if hasattr(a, "record")]
    assert [r["type"] for r in journal] == ["open"]
    again = Coordinator(config(min_agents=1), FedAvg(), journal=journal, run=RUN + 1)
    actions = again.start(1.0)
    assert not any(isinstance(a, SaveCheckpoint) for a in actions) and again.open.round == 1
    ck = next(a for a in again.receive(*update(again, "a0", [1, 1]), now=2.0) if isinstance(a, SaveCheckpoint))
    assert ck.state["run"] == RUN + 1


def test_the_run_id_is_checked():
    for bad in (0, -1, wire.MAX_RUN + 1):
        with pytest.raises(ValueError, match="run id"):
            Coordinator(config(), FedAvg(), run=bad)
    assert run_id(1_700_000_000.1234) == 1_700_000_000_123


def test_the_service_takes_the_run_from_its_clock_and_a_reset_federation_gets_a_larger_one(tmp_path):
    def service(now: float) -> AggregatorService:
        cfg = AggregatorConfig(federation="svc", rounds=2, state_dir=str(tmp_path / "state"),
                               model=ModelConfig(kind="linear", n_features=1, n_outputs=1), onnx=OnnxConfig(every=0))
        return AggregatorService(cfg, Loop(), clock=lambda: now)

    first = service(1_700_000_000.0)
    assert first.coordinator.run == 1_700_000_000_000
    first._execute(first.coordinator.start(1_700_000_000.0)[:1])  # the checkpoint only, nothing to publish to
    assert checkpoint.load(tmp_path / "state")["run"] == 1_700_000_000_000
    # restarted later: the same run
    assert service(1_700_000_100.0).coordinator.run == 1_700_000_000_000
    # the state directory wiped: a reset federation, a larger run
    (tmp_path / "state" / checkpoint.CHECKPOINT_NAME).unlink()
    assert service(1_700_000_200.0).coordinator.run == 1_700_000_200_000

