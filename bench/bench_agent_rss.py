"""Edge agent peak memory (RSS) while training the demo model for 20 rounds.

Measured, in a fresh child process: the real agent code path without the
network. The child imports only ``edge_agent`` (numpy, msgpack, paho-mqtt),
loads agent 0's digits shard from an .npz with ``edge_agent.data.load``,
splits a 20% holdout (the agent's default), builds an ``AgentCore``, and
for each round feeds it an encoded ``ModelMsg`` and ``TaskMsg`` through
``core.receive(topic, payload)`` and runs ``core.train(round)``. The update
it publishes is decoded and added to the model, so the next round trains on
a new model (FedAvg with one participant). Peak RSS is
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux), cross-checked
with ``VmHWM`` from ``/proc/self/status``.

Baseline, same run: peak RSS of a child of the same script that only imports
``numpy, msgpack, paho.mqtt.client`` (the interpreter + dependencies floor).

Two traps this script avoids:

* scikit-learn (needed to build the digits federation) adds tens of MB, so
  the shard is written by a separate preparation process, never by a
  measured one.
* On Linux a child's ``ru_maxrss`` starts from the peak RSS of the process
  it was forked from (``exec`` carries the old mm's high-water mark into
  ``signal->maxrss``), so the parent here imports nothing but the standard
  library and stays far below the floor being measured; ``VmHWM`` (per
  address space, reset by ``exec``) is printed next to it as a check.

Run: ``.venv/bin/python bench/bench_agent_rss.py [--repeat N] [--rounds R]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

AGENT_ID = "agent-0"
FED = "bench"
N_AGENTS = 10
HOLDOUT = 0.2
MODELS = {"softmax": ("softmax", 64, 10, ()), "mlp": ("mlp", 64, 10, (64,))}


# --------------------------------------------------------------------------
# children (each runs in a fresh interpreter)


def peak_kib() -> dict[str, int]:
    """Peak RSS so far: ru_maxrss and VmHWM, both in KiB."""
    hwm = 0
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return {"ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "vmhwm_kib": hwm}


def child_prepare(out_path: str) -> None:
    """Write agent 0's shard of the 10-agent digits federation to ``out_path`` (imports sklearn)."""
    import numpy as np

    from aggregator.datasets import federated_digits

    fd = federated_digits(N_AGENTS, "dirichlet", 0.5, 0)
    a = fd.agents[0]
    np.savez(out_path, X=a.X_train, y=a.y_train)
    print(json.dumps({"samples": int(len(a.X_train)), "features": int(a.X_train.shape[1])}))


def child_floor() -> None:
    """Baseline: the interpreter plus the agent's three dependencies, nothing else."""
    import msgpack  # noqa: F401
    import numpy  # noqa: F401
    import paho.mqtt.client  # noqa: F401

    print(json.dumps({"end": peak_kib()}))


def child_agent(data_path: str, kind: str, rounds: int) -> None:
    """The agent code path: load, split, AgentCore, ``rounds`` × (model, task, train)."""
    from edge_agent import wire
    from edge_agent.agent import AgentCore, Train
    from edge_agent.mqtt import Publish
    from edge_agent.data import load, split_holdout
    from edge_agent.models import BuiltinModel
    from edge_agent.spec import ModelSpec
    from edge_agent.topics import Topics

    after_import = peak_kib()
    X, y = load(data_path)
    core = AgentCore(agent_id=AGENT_ID, fed=FED, data=split_holdout(X, y, HOLDOUT, 0), seed=0)
    k, n_in, n_out, hidden = MODELS[kind]
    spec = ModelSpec(k, n_in, n_out, hidden)
    params = BuiltinModel(spec).init_params(seed=0)
    topics = Topics(FED)
    config = wire.TrainConfig(5, 32, 0.1)
    after_load = peak_kib()
    metrics: dict[str, float] = {}
    t0 = time.perf_counter()
    for rnd in range(1, rounds + 1):
        version = wire.params_version(params)
        # the model of round rnd - 1 is what round rnd trains on (agents refuse a task behind their model)
        model_payload = wire.encode(wire.ModelMsg(FED, rnd - 1, version, spec, params))
        task_payload = wire.encode(wire.TaskMsg(FED, rnd, version, config=config))
        notice = wire.encode(wire.SelectedMsg(FED, rnd, AGENT_ID, 0, version))
        actions = (core.receive(topics.model, model_payload) + core.receive(topics.selected(AGENT_ID), notice)
                   + core.receive(topics.task, task_payload))
        if [a for a in actions if isinstance(a, Train)] != [Train(rnd)]:
            raise SystemExit(f"round {rnd}: agent did not ask to train: {actions} (rejected {dict(core.rejected)})")
        publish = next(a for a in core.train(rnd) if isinstance(a, Publish))
        update = wire.decode(publish.payload, expect="update", fed=FED, spec=spec)
        params = {name: (params[name] + update.delta[name]).astype("float32") for name in params}
        metrics = update.metrics
    seconds = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "after_import": after_import,
                "after_load": after_load,
                "end": peak_kib(),
                "train_samples": core.data.num_samples,
                "holdout_samples": int(len(core.data.X_holdout)),
                "params": spec.num_params(),
                "updates_sent": core.updates_sent,
                "seconds": seconds,
                "last_metrics": metrics,
            }
        )
    )


# --------------------------------------------------------------------------
# parent (standard library only: see the module docstring)


def run_child(*args: str) -> dict:
    """Run this script in child mode in a fresh interpreter; return its JSON line."""
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"child {args} failed ({proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mib(kib: float) -> str:
    return f"{kib / 1024:7.1f}"


def summarize(runs: list[dict], key: str) -> float:
    """Median over runs of one peak figure at the end of the child."""
    return statistics.median(r["end"][key] for r in runs)


def report(floor: list[dict], agents: dict[str, list[dict]], rounds: int) -> None:
    """Table of peak RSS (MiB) per child kind, and the difference to the floor."""
    f_rss, f_hwm = summarize(floor, "ru_maxrss_kib"), summarize(floor, "vmhwm_kib")
    print(f"{'child':<40} {'ru_maxrss MiB':>14} {'VmHWM MiB':>10} {'- floor MiB':>12}")
    print(f"{'import numpy, msgpack, paho [baseline]':<40} {mib(f_rss):>14} {mib(f_hwm):>10} {mib(0):>12}")
    for kind, runs in agents.items():
        rss, hwm = summarize(runs, "ru_maxrss_kib"), summarize(runs, "vmhwm_kib")
        print(f"{f'agent, {kind}, {rounds} rounds':<40} {mib(rss):>14} {mib(hwm):>10} {mib(rss - f_rss):>12}")
    print(f"(median of {len(floor)} fresh children each; 1 MiB = 1024 KiB)")
    for kind, runs in agents.items():
        r = runs[-1]
        print(
            f"{kind}: {r['params']} params, {r['train_samples']} train + {r['holdout_samples']} holdout samples; "
            f"peak after imports {mib(r['after_import']['ru_maxrss_kib']).strip()} MiB, after data+core "
            f"{mib(r['after_load']['ru_maxrss_kib']).strip()} MiB; {r['updates_sent']} updates in {r['seconds']:.2f} s; "
            f"last round {json.dumps({k: round(v, 3) for k, v in r['last_metrics'].items()})}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3, help="fresh children per configuration (default 3)")
    p.add_argument("--rounds", type=int, default=20, help="training rounds per agent child (default 20)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        role, *rest = args.child
        if role == "prepare":
            child_prepare(rest[0])
        elif role == "floor":
            child_floor()
        else:
            child_agent(rest[0], rest[1], int(rest[2]))
        return
    print(f"python {sys.version.split()[0]} ({sys.executable}), {os.cpu_count()} CPUs")
    print(f"parent peak RSS (must stay below the floor): {mib(peak_kib()['ru_maxrss_kib']).strip()} MiB")
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "agent0.npz")
        shard = run_child("prepare", data)
        print(f"agent 0 of {N_AGENTS} (digits, dirichlet 0.5, seed 0): {shard['samples']} samples")
        floor = [run_child("floor") for _ in range(args.repeat)]
        agents = {
            kind: [run_child("agent", data, kind, str(args.rounds)) for _ in range(args.repeat)] for kind in MODELS
        }
    report(floor, agents, args.rounds)


if __name__ == "__main__":
    main()
