"""The server's Python API: run a federation's aggregator from Python.

``fedmqtt.Aggregator`` and ``fedmqtt.run_aggregator`` are re-exported from
here; ``fedmqtt aggregator`` (the CLI, and systemd) runs the same service.
"""

from __future__ import annotations

import logging
import queue
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from edge_agent.config import ConfigError, config_of
from edge_agent.data import Batches, local_data
from edge_agent.model_api import FedModel
from edge_agent.lifecycle import LoopService
from edge_agent.model_loader import named
from edge_agent.mqtt import Loop

from .config import AggregatorConfig
from .coordinator import Finished, RoundClosed, RoundSummary

log = logging.getLogger(__name__)

Evaluator = Callable[[Mapping[str, np.ndarray]], dict[str, float]]


def aggregator_config(config: AggregatorConfig | str | Path | Mapping[str, Any]) -> AggregatorConfig:
    """An :class:`AggregatorConfig` from an object, a TOML file or a dict of the same keys (checked)."""
    return config_of(AggregatorConfig, config, "aggregator.toml")


class Aggregator(LoopService):
    """A federation's aggregator: opens rounds, folds the agents' updates, publishes each new model.

    ``config`` is an :class:`AggregatorConfig` (or a path to its TOML file,
    or a dict of its keys). ``model`` is a :class:`fedmqtt.Model` instance
    that replaces ``[model]`` (the agents must train the same class).
    ``evaluate(params) -> metrics`` or ``test_data=(X, y)`` evaluates every
    new global model centrally (otherwise ``config.test_data``, if set).
    State, journal and checkpoints live in ``config.state_dir``: an
    aggregator started again on the same directory resumes the federation.

    Use :meth:`run` in the foreground, or :meth:`start` / :meth:`wait` /
    :meth:`stop` (also as a context manager). :attr:`params` is the current
    global model, :attr:`history` the closed rounds.
    """

    def __init__(self, config: AggregatorConfig | str | Path | Mapping[str, Any], *, model: FedModel | None = None,
                 evaluate: Evaluator | None = None, test_data: Any = None,
                 on_round: Callable[[RoundSummary], None] | None = None, loop: Loop | None = None,
                 on_ready: Callable[[], None] | None = None) -> None:
        from .service import AggregatorService  # the service pulls in the strategies, checkpoints and journal

        cfg = aggregator_config(config)
        if model is not None:
            model = named(model)
            cfg.model.use(model)
        if test_data is not None:
            if evaluate is not None:
                raise ConfigError("give evaluate= or test_data=, not both")
            evaluate = _evaluator(cfg.model.build(), test_data)
        self.config = cfg
        self._init_loop(loop)
        self.thread_name = f"fedmqtt-aggregator-{cfg.federation}"
        self._on_round = on_round
        self.finish: Finished | None = None
        self.rounds: "queue.Queue[RoundSummary]" = queue.Queue()
        self.service = AggregatorService(cfg, self.loop, evaluate=evaluate, on_round=self._round,
                                         on_finished=self._finished, on_ready=on_ready)
        self.service.fatal_callback = self._failed

    # -- what a caller sees ----------------------------------------------------

    @property
    def coordinator(self):
        """The sans-I/O round coordinator (read it from the loop thread, or once the run is over)."""
        return self.service.coordinator

    @property
    def params(self) -> dict[str, np.ndarray]:
        """The current global model's parameters (a copy)."""
        return {k: v.copy() for k, v in self.coordinator.params.items()}

    @property
    def round(self) -> int:
        return self.coordinator.round

    @property
    def history(self) -> list[RoundSummary]:
        return list(self.coordinator.history)

    # -- running ---------------------------------------------------------------

    def run(self) -> Finished | None:
        """Serve in this thread until the federation finishes (or :meth:`stop`); returns why it finished.

        Raises ConfigError if the broker refused the aggregator for good.
        """
        super().run()
        return self.finish

    def _begin(self) -> None:
        self.service.start()

    def _round(self, ev: RoundClosed) -> None:
        self.rounds.put(ev.summary)
        if self._on_round is not None:
            self._on_round(ev.summary)

    def _finished(self, finish: Finished) -> None:
        self.finish = finish
        self.finished.set()
        if self._own_loop and self._started_in_foreground():
            self.loop.stop()

    def _started_in_foreground(self) -> bool:
        return self.loop.thread is None


def run_aggregator(config: AggregatorConfig | str | Path | Mapping[str, Any], **kwargs: Any) -> Aggregator:
    """Run an aggregator in the foreground until the federation finishes; returns it (params, history)."""
    agg = Aggregator(config, **kwargs)
    agg.run()
    return agg


def _evaluator(model: FedModel, test_data: Any) -> Evaluator:
    if isinstance(test_data, Batches):
        raise ConfigError("test_data must be arrays (X, y), a path or a callable returning arrays, not Batches")
    data = local_data(test_data, holdout=0.0)
    X, y = data.training_rows()
    model.check_data(X, y, "test_data")
    return lambda params: model.evaluate(params, X, y)


__all__ = ["Aggregator", "run_aggregator", "aggregator_config"]
