"""Broker tier sizing: QoS 1 messages/s through one mosquitto vs a 3-node NATS server cluster.

The question deploy/scale.md ("Broker tier") answers with it: how many
update-sized messages a second does each tier carry for the same payloads.
``--publishers`` processes each publish ``--count`` QoS 1 messages of one
size to ``bench/<i>`` as fast as paho's in-flight window (20) lets them; one
subscriber process (QoS 1, its own process) counts them. Messages/s is
counted at the subscriber, from its first message to its last: what the
aggregator would ingest. Both tiers are driven with MQTT 3.1.1 (what NATS
speaks) by the same client code; on NATS the subscriber is on node 1 and the
publishers on nodes 2 and 3, as agents and aggregator are in
tests/test_nats_cluster.py, so every message crosses a route and is stored
in the replicated JetStream stream (R3) before its PUBACK.

The clients are Python (paho) on the same 2-core machine as the brokers: the
figures are what this machine does end to end, a lower bound for a broker
on its own hardware; the ratio between the tiers is the point.

Run::

    timeout 900 .venv/bin/python bench/bench_brokers.py [--publishers 4] [--sizes 1024,102400]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from aggregator.broker import LocalBroker  # noqa: E402
from aggregator.nats_cluster import NatsCluster, find_nats_server  # noqa: E402

# How long one measurement may take before it is reported as incomplete.
RUN_TIMEOUT_S = 180.0
# Messages per publisher by payload size: about 2 MB (small) to 20 MB (large) each,
# seconds of work per tier on this machine.
DEFAULT_COUNTS = {1024: 2000, 102400: 200}


def _client(cid: str) -> paho.Client:
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=paho.MQTTv311, clean_session=True)
    c.max_queued_messages_set(0)  # the whole batch is queued up front; paho's window paces it
    return c


def _connect(c: paho.Client, port: int) -> None:
    ok = multiprocessing.Event()
    c.on_connect = lambda *_a: ok.set()
    c.connect("127.0.0.1", port)
    c.loop_start()
    if not ok.wait(30):
        raise RuntimeError(f"no CONNACK from 127.0.0.1:{port}")


def publisher(port: int, index: int, size: int, count: int, go, done) -> None:
    c = _client(f"bench-pub-{index}")
    _connect(c, port)
    acked = multiprocessing.Event()
    n = [0]

    def on_publish(*_a) -> None:
        n[0] += 1
        if n[0] == count:
            acked.set()

    c.on_publish = on_publish
    payload = bytes(size)
    go.wait()
    for _ in range(count):
        c.publish(f"bench/{index}", payload, qos=1)
    acked.wait(RUN_TIMEOUT_S)
    done.put(n[0])
    c.disconnect()
    c.loop_stop()


def subscriber(port: int, expected: int, ready, result) -> None:
    c = _client("bench-sub")
    times: list[float] = []

    def on_message(_c, _u, _m) -> None:
        times.append(time.perf_counter())

    subscribed = multiprocessing.Event()
    c.on_message = on_message
    c.on_subscribe = lambda *_a: subscribed.set()
    _connect(c, port)
    c.subscribe("bench/+", qos=1)
    subscribed.wait(30)
    ready.set()
    end = time.monotonic() + RUN_TIMEOUT_S
    while len(times) < expected and time.monotonic() < end:
        time.sleep(0.05)
    c.disconnect()
    c.loop_stop()
    got = len(times)
    span = times[-1] - times[0] if got > 1 else 0.0
    result.put((got, span))


def measure(sub_port: int, pub_ports: list[int], size: int, count: int) -> tuple[float, int, int]:
    """(messages/s at the subscriber, messages received, messages sent) for one payload size."""
    ctx = multiprocessing.get_context("spawn")
    ready, go = ctx.Event(), ctx.Event()
    result, done = ctx.Queue(), ctx.Queue()
    expected = count * len(pub_ports)
    sub = ctx.Process(target=subscriber, args=(sub_port, expected, ready, result))
    sub.start()
    if not ready.wait(60):
        sub.kill()
        raise RuntimeError("the subscriber did not subscribe")
    pubs = [ctx.Process(target=publisher, args=(p, i, size, count, go, done)) for i, p in enumerate(pub_ports)]
    for p in pubs:
        p.start()
    time.sleep(2.5)  # the publishers connect (NATS: JetStream session setup) before the clock matters
    go.set()
    got, span = result.get(timeout=RUN_TIMEOUT_S + 60)
    sent = sum(done.get(timeout=60) for _ in pubs)
    for p in [sub, *pubs]:
        p.join(10)
        if p.is_alive():
            p.kill()
    return (got - 1) / span if span > 0 else 0.0, got, sent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--publishers", type=int, default=4)
    ap.add_argument("--sizes", default="1024,102400", help="payload sizes in bytes, comma-separated")
    ap.add_argument("--count", type=int, default=0, help="messages per publisher (0: by size, DEFAULT_COUNTS)")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    counts = {s: a.count or DEFAULT_COUNTS.get(s, max(20, 2_000_000 // s)) for s in sizes}
    rows: dict[int, dict[str, tuple[float, int, int]]] = {s: {} for s in sizes}
    with LocalBroker() as mosq:
        for s in sizes:
            rows[s]["mosquitto"] = measure(mosq.port, [mosq.port] * a.publishers, s, counts[s])
    if find_nats_server() is None:
        print("nats-server is not installed (scripts/setup.sh installs it with apt-get): NATS not measured")
        for s in sizes:
            rows[s]["nats"] = (0.0, 0, 0)
    else:
        with NatsCluster(3) as nats:
            ports = [n.mqtt_port for n in nats.nodes]
            pub_ports = [ports[1 + i % 2] for i in range(a.publishers)]  # nodes 2 and 3
            for s in sizes:
                rows[s]["nats"] = measure(ports[0], pub_ports, s, counts[s])
    print(f"QoS 1, MQTT 3.1.1, {a.publishers} publishers -> 1 subscriber; messages/s at the subscriber")
    print(f"{'payload':>10} {'msgs':>7} {'mosquitto 2.0 (1 node)':>24} {'NATS 2.9 (3 nodes, R3)':>24} {'ratio':>7}")
    for s in sizes:
        m, n = rows[s]["mosquitto"], rows[s]["nats"]
        total = counts[s] * a.publishers
        note = "" if m[1] == total and n[1] == total else f"  (received {m[1]} / {n[1]} of {total})"
        ratio = m[0] / n[0] if n[0] else float("nan")
        print(f"{s:>10} {total:>7} {m[0]:>18,.0f} msg/s {n[0]:>18,.0f} msg/s {ratio:>6.1f}x{note}")
        print(f"{'':>10} {'':>7} {m[0] * s / 1e6:>19,.1f} MB/s {n[0] * s / 1e6:>19,.1f} MB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
