"""Rejection log lines are thinned per reason; the counters stay exact."""

from __future__ import annotations

import logging

from aggregator.config import AggregatorConfig
from aggregator.coordinator import Coordinator
from aggregator.strategies import FedAvg
from edge_agent.ratelog import LOG_BURST, LOG_WINDOW_S, RejectionLog
from edge_agent.topics import Topics


def test_a_flood_of_garbage_costs_a_few_lines_and_exact_counters(caplog):
    cfg = AggregatorConfig(federation="f")
    cfg.security.rate_limit = 0  # count every garbage message as garbage, not as rate-limited
    co = Coordinator(cfg, FedAvg())
    co.start(0.0)
    t = Topics("f")
    with caplog.at_level(logging.WARNING, logger="aggregator.coordinator"):
        for i in range(1000):
            co.receive(t.update(f"a{i % 10}"), b"\xc1garbage", now=i * 0.01)  # 10 s of flood
        for i in range(3):
            co.receive(t.update("a0"), b"\xc1garbage", now=LOG_WINDOW_S + 20 + i)
    dropped = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert sum(co.rejected.values()) == 1003 and len(co.rejected) == 1
    # a burst, then a summary of the rest once the window has passed, then a new burst
    assert len(dropped) == LOG_BURST + 1 + 3
    summary = [r.getMessage() for r in dropped if "were not logged" in r.getMessage()]
    assert summary == [f"{1000 - LOG_BURST} more dropped ({next(iter(co.rejected))}) in {LOG_WINDOW_S + 20:.0f} s "
                       "were not logged"]


def test_each_reason_has_its_own_burst():
    lines = []

    class Sink(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logger = logging.getLogger("test.ratelog")
    logger.addHandler(Sink())
    logger.propagate = False
    now = [0.0]
    rl = RejectionLog(logger, clock=lambda: now[0])
    for _ in range(20):
        rl.log("a", "x")
        rl.log("b", "y")
    assert sum("(a)" in m for m in lines) == LOG_BURST and sum("(b)" in m for m in lines) == LOG_BURST
