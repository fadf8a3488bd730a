"""Secure aggregation: device CPU, bytes and aggregator CPU of one SecAgg / SecAgg+ round, against plain FedAvg.

Measured: one round of the real protocol run in process, message by message
through the real codec, as ``tests/test_secagg.py``'s ``Harness`` runs it:
``edge_agent.secagg.client.SecAggClient`` on each of n devices and
``aggregator.secagg.make_round`` on the aggregator, with the coordinator's
defaults (``round_params(mode, n, degree, 0, 16, 1.0, 0.0)``: 16-bit
quantization, range ±1, threshold a majority of a device's peers, no DP).
Modes: ``secagg`` (every pair of devices) and ``secagg+`` with degree
k = max(4, 2·ceil(log2 n)), what ``Coordinator._secagg_degree`` uses by
default. The update is a linear model's: d parameters in one flat float32
vector (``ModelSpec("linear", d - 1, 1)``: W0[d-1, 1] + b0[1]), normal × 0.01.

Per configuration:

- device CPU (``time.process_time``) of each client step: construction +
  ``advertise`` (stage 1: two X25519 key pairs), ``on_peers`` (stage 2:
  Shamir shares, one key agreement and one AES-GCM seal per peer),
  ``on_route`` (stage 3: open the shares, quantize, expand the self mask
  and one pairwise mask per peer with AES-CTR), ``on_unmask_req``
  (stage 4); mean per device, and the total per device. The device's own
  codec work (``messages.encode`` of what it sends, ``decode`` of its inbox)
  is timed apart;
- bytes a device sends (``len(encode(msg))`` of its four messages) and
  receives (its three inbox payloads);
- aggregator CPU: every ``SecAggRound.receive`` / ``agent_offline`` call
  (which includes closing each stage: building and encoding the inbox
  messages, and at the end the Shamir reconstructions and mask removal),
  ``make_round``, and the ``messages.decode`` of the devices' payloads
  (printed apart);
- the round's wall time in this one process (every device and the
  aggregator one after another on one core: not a deployed round's
  latency, where devices run in parallel);
- the expansion factor: bytes a device sends / bytes of the plain update
  message (``wire.encode(UpdateMsg)`` of the same d-parameter float32
  delta), and / raw float32 bytes (4·d).

With ``drop``, 10% of the devices (every 10th) die after sending their
shares (stage 2), the costly case: the aggregator must rebuild each one's
mask key from t shares and recompute its pairwise mask with every survivor.
Devices' figures are means over the devices that finished the round.

Baseline, same run, same n, d and updates: a plain FedAvg round. Each
device ``wire.encode``s an ``UpdateMsg`` (device CPU); the aggregator
``wire.decode``s each with the spec and folds it with
``aggregator.strategies.FedAvg`` (begin, n × add, result: aggregator CPU).

Each result is checked before it is reported: the secure sum must be the
survivors' float sum within the quantization bound, FedAvg's result the
weighted mean. Figures are medians over ``--repeat`` rounds (default 3) of
each configuration; the full run takes about a minute on 2 cores (full SecAgg
at n = 100, d = 100,000, the costliest, about 5 s a round).

Run: ``.venv/bin/python bench/bench_secagg.py [--quick] [--repeat N] [--profile]``
(``--quick``: n = 10, 50 and d = 10,000 only.)
"""

from __future__ import annotations

import argparse
import cProfile
import math
import pstats
import statistics
import time
from dataclasses import dataclass, field

import numpy as np

from _common import machine_line
from aggregator.secagg import ACTIVE_STAGES as AGG_STAGES, make_round, round_params
from aggregator.strategies import FedAvg
from edge_agent import wire
from edge_agent.secagg import messages as M
from edge_agent.secagg.client import SecAggClient
from edge_agent.secagg.quantize import quantization_error_bound
from edge_agent.spec import ModelSpec

FED = "bench"
QBITS, RANGE = 16, 1.0  # SecAggConfig defaults (bits, range)
STEPS = ("advertise", "on_peers", "on_route", "on_unmask_req")
DROP_FRACTION = 0.1
EXPANSION_GOAL = 2.0  # every mode and size
EXPANSION_GOAL_PLUS_100 = 1.2  # SecAgg+ at n = 100


def default_degree(n: int) -> int:
    """Coordinator._secagg_degree for mode secagg+ with degree 0 (the default)."""
    return max(4, 2 * math.ceil(math.log2(max(2, n))))


def make_inputs(n: int, d: int, seed: int = 0) -> tuple[list[str], dict[str, np.ndarray], dict[str, int]]:
    """Device names, one flat float32 update of d parameters each, and sample counts."""
    rng = np.random.default_rng(seed)
    names = [f"d{i:03d}" for i in range(n)]
    updates = {a: rng.standard_normal(d, dtype=np.float32) * np.float32(0.01) for a in names}
    counts = {a: int(c) for a, c in zip(names, rng.integers(20, 400, size=n))}
    return names, updates, counts


@dataclass
class Run:
    """Figures of one round (seconds and bytes); device figures are per device that finished."""

    dev_steps: list[float]  # mean s per device, one per step (plain: [encode])
    dev_codec: float  # mean s per device in its own encode/decode (plain: 0, encode is the step)
    sent: float  # mean bytes sent per device
    recv: float  # mean bytes received per device
    agg: float  # aggregator CPU s, protocol (plain: decode + fold)
    agg_decode: float  # aggregator CPU s in decoding the devices' payloads (plain: inside agg)
    agg_stages: list[float] = field(default_factory=list)  # s of agg, by the round's stage at the call
    wall: float = 0.0
    peers: int = 0  # peers per device
    contributors: int = 0

    @property
    def dev_total(self) -> float:
        return sum(self.dev_steps)


# -- the baseline: a plain FedAvg round -------------------------------------------------

def plain_round(names: list[str], updates: dict[str, np.ndarray], counts: dict[str, int]) -> Run:
    d = next(iter(updates.values())).size
    spec = ModelSpec("linear", d - 1, 1)
    global_params = {k: np.zeros(s, dtype=np.float32) for k, s in spec.param_shapes().items()}
    base = wire.params_version(global_params)
    strategy = FedAvg(weighted=True)
    strategy.begin(global_params)  # allocate the float64 sum once, as every round after the first
    wall0 = time.perf_counter()
    enc, payloads = [], []
    for a in names:
        u = updates[a]
        t0 = time.process_time()
        payloads.append(wire.encode(wire.UpdateMsg(FED, 1, a, base, counts[a],
                                                   {"W0": u[:-1].reshape(d - 1, 1), "b0": u[-1:]})))
        enc.append(time.process_time() - t0)
    t0 = time.process_time()
    strategy.begin(global_params)
    for p in payloads:
        msg = wire.decode(p, expect="update", fed=FED, spec=spec)
        strategy.add(msg.delta, msg.num_samples)
    result = strategy.result(global_params)
    agg = time.process_time() - t0
    wall = time.perf_counter() - wall0
    w = np.array([counts[a] for a in names], dtype=np.float64)
    expected = sum(w[i] * updates[a].astype(np.float64) for i, a in enumerate(names)) / w.sum()
    got = np.concatenate([result["W0"].ravel(), result["b0"]])
    if not np.allclose(got, expected, rtol=1e-5, atol=1e-7):
        raise SystemExit("plain FedAvg: the result differs from the weighted mean")
    sizes = [len(p) for p in payloads]
    return Run(dev_steps=[statistics.fmean(enc)], dev_codec=0.0, sent=statistics.fmean(sizes), recv=0.0,
               agg=agg, agg_decode=0.0, wall=wall, contributors=len(names))


# -- one secure-aggregation round, instrumented -------------------------------------------

def secagg_round(names: list[str], updates: dict[str, np.ndarray], mode: str, drop: bool) -> Run:
    """The whole protocol in process (as tests/test_secagg.py's Harness), timing every call."""
    n, d = len(names), next(iter(updates.values())).size
    degree = default_degree(n) if mode == "secagg+" else 0
    params = round_params(mode, n, degree, 0, QBITS, RANGE, 0.0)
    dropped = set(names[::int(round(1 / DROP_FRACTION))]) if drop else set()
    cpu = {a: [0.0] * len(STEPS) for a in names}
    codec = dict.fromkeys(names, 0.0)
    sent, recv = dict.fromkeys(names, 0), dict.fromkeys(names, 0)
    agg_stage = dict.fromkeys(AGG_STAGES, 0.0)
    agg_decode = 0.0
    step_of = {M.SAPeers: 1, M.SARoute: 2, M.SAUnmaskReq: 3}

    wall0 = time.perf_counter()
    t0 = time.process_time()
    srv = make_round(FED, 1, 0, names, params, degree, d, 100.0, 10.0)
    agg_stage["keys"] += time.process_time() - t0
    clients: dict[str, SecAggClient] = {}
    outgoing: list[tuple[str, bytes]] = []
    for a in names:
        t0 = time.process_time()
        clients[a] = SecAggClient(FED, a, 1, 0, names, params, updates[a])
        msg = clients[a].advertise()
        t1 = time.process_time()
        payload = M.encode(msg)
        codec[a] += time.process_time() - t1
        cpu[a][0] += t1 - t0
        outgoing.append((a, payload))
    dead: set[str] = set()
    stage = 1
    while outgoing:
        pubs = []
        for a, payload in outgoing:
            sent[a] += len(payload)
            t0 = time.process_time()
            msg = M.decode(payload, fed=FED, kinds=M.DEVICE_KINDS)
            t1 = time.process_time()
            before = srv.stage
            pubs += srv.receive(a, msg, 0.0)
            t2 = time.process_time()
            agg_decode += t1 - t0
            agg_stage[before] += t2 - t1
        if stage == 2:
            for a in sorted(dropped):  # their last wills, right after their shares went out
                dead.add(a)
                before = srv.stage
                t0 = time.process_time()
                pubs += srv.agent_offline(a, 0.0)
                agg_stage[before] += time.process_time() - t0
        outgoing = []
        for p in pubs:
            a = p.topic.split("/")[-2]
            if a in dead:
                continue
            recv[a] += len(p.payload)
            c = clients[a]
            t0 = time.process_time()
            msg = M.decode(p.payload, fed=FED, kinds=M.SERVER_KINDS)
            t1 = time.process_time()
            step = step_of[type(msg)]
            reply = (c.on_peers, c.on_route, c.on_unmask_req)[step - 1](msg)
            t2 = time.process_time()
            payload = M.encode(reply)
            t3 = time.process_time()
            cpu[a][step] += t2 - t1
            codec[a] += (t1 - t0) + (t3 - t2)
            outgoing.append((a, payload))
        stage += 1
    wall = time.perf_counter() - wall0

    survivors = [a for a in names if a not in dropped]
    if srv.stage != "done" or srv.contributors != set(survivors):
        raise SystemExit(f"{mode} n={n} d={d}: round ended at {srv.stage} ({srv.why}) with "
                         f"{len(srv.contributors)} of {len(survivors)} contributors")
    expected = sum(updates[a].astype(np.float64) for a in survivors)
    err = float(np.abs(srv.result - expected).max())
    if err > quantization_error_bound(len(survivors), RANGE, QBITS):
        raise SystemExit(f"{mode} n={n} d={d}: the secure sum is off by {err:g}, more than quantization allows")
    return Run(
        dev_steps=[statistics.fmean(cpu[a][i] for a in survivors) for i in range(len(STEPS))],
        dev_codec=statistics.fmean(codec[a] for a in survivors),
        sent=statistics.fmean(sent[a] for a in survivors), recv=statistics.fmean(recv[a] for a in survivors),
        agg=sum(agg_stage.values()), agg_decode=agg_decode, agg_stages=[agg_stage[s] for s in AGG_STAGES],
        wall=wall, peers=len(next(iter(srv.peers.values()))), contributors=len(survivors),
    )


def median_run(runs: list[Run]) -> Run:
    """Figure by figure median of several rounds of one configuration."""
    def med(get):
        return statistics.median(get(r) for r in runs)

    r0 = runs[0]
    return Run(
        dev_steps=[med(lambda r, i=i: r.dev_steps[i]) for i in range(len(r0.dev_steps))],
        dev_codec=med(lambda r: r.dev_codec), sent=med(lambda r: r.sent), recv=med(lambda r: r.recv),
        agg=med(lambda r: r.agg), agg_decode=med(lambda r: r.agg_decode),
        agg_stages=[med(lambda r, i=i: r.agg_stages[i]) for i in range(len(r0.agg_stages))],
        wall=med(lambda r: r.wall), peers=r0.peers, contributors=r0.contributors,
    )


# -- the plan, the run, the tables ------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    mode: str  # "plain", "secagg", "secagg+"
    n: int
    d: int
    drop: bool = False


def plan(quick: bool) -> list[Config]:
    ns, ds = ((10, 50), (10_000,)) if quick else ((10, 50, 100), (10_000, 100_000))
    out = []
    for d in ds:
        for n in ns:
            out.append(Config("plain", n, d))
            for mode in ("secagg", "secagg+"):
                out.append(Config(mode, n, d))
                if n >= 50:
                    out.append(Config(mode, n, d, drop=True))
    return out


def measure(configs: list[Config], repeat: int) -> dict[Config, Run]:
    # Warm-up: import and initialise everything (cryptography's backend, numpy paths) off the clock.
    names, updates, counts = make_inputs(4, 64)
    secagg_round(names, updates, "secagg", False)
    plain_round(names, updates, counts)
    results = {}
    for c in configs:
        names, updates, counts = make_inputs(c.n, c.d)
        reps = repeat
        t0 = time.perf_counter()
        if c.mode == "plain":
            runs = [plain_round(names, updates, counts) for _ in range(reps)]
        else:
            runs = [secagg_round(names, updates, c.mode, c.drop) for _ in range(reps)]
        results[c] = median_run(runs)
        print(f"  measured {label(c)} n={c.n} d={c.d:,}: {reps} round(s) in {time.perf_counter() - t0:.1f} s",
              flush=True)
    return results


def label(c: Config) -> str:
    if c.mode == "plain":
        return "plain FedAvg [baseline]"
    return c.mode + (" 10% drop" if c.drop else "")


def report(configs: list[Config], res: dict[Config, Run]) -> list[tuple[Config, float, float, float, bool]]:
    """Print the main table and the breakdown; per secure row: (config, expansion, vs 16-bit raw, goal, met)."""
    print("\nPer device (means over the devices that finished): CPU of the client steps, bytes sent and received;"
          "\naggregator: CPU of make_round + receive/agent_offline + decoding the devices' payloads;"
          " in-process wall time."
          "\nBaseline rows: device = wire.encode(UpdateMsg), aggregator = wire.decode + FedAvg begin/add/result.")
    head = (f"{'mode':<24} {'n':>4} {'d':>8} {'k':>3} {'dev CPU ms':>10} {'x base':>7} {'sent KB':>9} {'recv KB':>8} "
            f"{'x upd':>6} {'x 4d':>6} {'agg CPU ms':>11} {'x base':>7} {'wall s':>7}")
    print(head)
    print("-" * len(head))
    goals = []
    base: Run | None = None
    for c in configs:
        r = res[c]
        if c.mode == "plain":
            base = r
        assert base is not None
        plain_bytes = base.sent
        dev = r.dev_total + r.dev_codec
        agg = r.agg + r.agg_decode
        base_agg = base.agg
        k = "-" if c.mode == "plain" else str(r.peers)
        print(f"{label(c):<24} {c.n:>4} {c.d:>8,} {k:>3} {1e3 * dev:>10.2f} {dev / base.dev_total:>7.0f} "
              f"{r.sent / 1e3:>9.1f} {r.recv / 1e3:>8.1f} {r.sent / plain_bytes:>6.3f} {r.sent / (4 * c.d):>6.3f} "
              f"{1e3 * agg:>11.1f} {agg / base_agg:>7.1f} {r.wall:>7.3f}")
        if c.mode != "plain":
            goal = EXPANSION_GOAL_PLUS_100 if c.mode == "secagg+" and c.n >= 100 else EXPANSION_GOAL
            goals.append((c, r.sent / plain_bytes, r.sent / (QBITS / 8 * c.d), goal, r.sent / plain_bytes <= goal))
    print("(dev CPU = the four client steps + the device's own encode/decode; 'x upd' = bytes sent / "
          "len(wire.encode(UpdateMsg)) of the baseline row above, 'x 4d' = / raw float32 bytes)")

    print("\nBreakdown, ms: device steps (mean per device), device codec; aggregator CPU by the round's stage at the "
          "call\n(a stage's column includes closing it: 'unmask' holds the Shamir reconstructions and mask removal), "
          "and decoding")
    head = (f"{'mode':<24} {'n':>4} {'d':>8} {'advertise':>9} {'on_peers':>9} {'on_route':>9} {'on_unmask':>9} "
            f"{'codec':>7} | {'keys':>7} {'shares':>7} {'masked':>8} {'unmask':>8} {'decode':>7}")
    print(head)
    print("-" * len(head))
    for c in configs:
        r = res[c]
        if c.mode == "plain":
            print(f"{label(c):<24} {c.n:>4} {c.d:>8,} {'encode ' + format(1e3 * r.dev_steps[0], '.3f'):>39} "
                  f"{'':>7} | {'decode + fold ' + format(1e3 * r.agg, '.1f'):>41}")
            continue
        s, a = r.dev_steps, r.agg_stages
        print(f"{label(c):<24} {c.n:>4} {c.d:>8,} {1e3 * s[0]:>9.3f} {1e3 * s[1]:>9.3f} {1e3 * s[2]:>9.3f} "
              f"{1e3 * s[3]:>9.3f} {1e3 * r.dev_codec:>7.3f} | {1e3 * a[0]:>7.1f} {1e3 * a[1]:>7.1f} "
              f"{1e3 * a[2]:>8.1f} {1e3 * a[3]:>8.1f} {1e3 * r.agg_decode:>7.1f}")
    return goals


def print_goals(goals: list[tuple[Config, float, float, float, bool]]) -> None:
    print(f"\nExpansion goals (bytes a device sends / plain UpdateMsg bytes): <= {EXPANSION_GOAL}x everywhere, "
          f"<= {EXPANSION_GOAL_PLUS_100}x for SecAgg+ at n = 100 (Bonawitz et al. 2017 report 1.73x for 2^10 users, "
          "2^20 dims, 16-bit inputs)")
    for c, x, x16, goal, met in goals:
        print(f"  {label(c):<18} n={c.n:<4} d={c.d:<8,} {x:6.3f}x  goal <= {goal}x: {'met' if met else 'NOT MET'}"
              f"   ({x16:.2f}x of raw {QBITS}-bit inputs, Bonawitz et al.'s basis)")
    print(f"all met: {all(m for *_, m in goals)}")


def profile_round(n: int, d: int, mode: str) -> None:
    """cProfile of one round with 10% dropping after stage 2: where device and aggregator time goes."""
    names, updates, _ = make_inputs(n, d)
    prof = cProfile.Profile()
    prof.enable()
    secagg_round(names, updates, mode, True)
    prof.disable()
    print(f"\ncProfile of one {mode} round, n={n}, d={d:,}, 10% dropping after stage 2 (tottime, top 14):")
    pstats.Stats(prof).sort_stats("tottime").print_stats(14)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="n = 10, 50 and d = 10,000 only")
    p.add_argument("--repeat", type=int, default=3, help="rounds per configuration, median reported (default 3)")
    p.add_argument("--profile", action="store_true", help="also cProfile one secagg round (n=50, d=100,000)")
    args = p.parse_args()
    print(machine_line())
    t0 = time.perf_counter()
    configs = plan(args.quick)
    res = measure(configs, args.repeat)
    print_goals(report(configs, res))
    print(f"\n{time.perf_counter() - t0:.1f} s in all")
    if args.profile:
        profile_round(50, 10_000 if args.quick else 100_000, "secagg")


if __name__ == "__main__":
    main()
