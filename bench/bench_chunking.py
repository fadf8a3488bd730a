"""Big models in chunks: a 100M-parameter model (400 MB of float32) split, sent through mosquitto, reassembled.

Measured, one payload of ``--params`` float32 values (default 100,000,000:
400,000,000 bytes, random, so nothing compresses or dedupes):

- ``split``: ``edge_agent.chunking.split`` (the per-chunk SHA-256 digests and
  the payload's SHA-256; the chunks are views, no copy) plus
  ``encode_chunk`` of every chunk, as a sender does it.
- ``broker, chunked``: a sender process-side paho client publishes the
  manifest and the chunks at QoS 1 through a real mosquitto (a window of
  ``chunking.SEND_WINDOW`` chunks in flight, as the agent does), and a
  receiver in a separate process decodes every chunk and reassembles the
  payload with a ``Reassembler`` (each chunk's SHA-256 on arrival, the
  whole payload's at the end). Timed from the first publish to the
  reassembled, hash-checked payload in the receiver; the receiver reports its
  own peak RSS (``ru_maxrss``), which is the bounded-memory claim: one
  payload buffer plus a chunk, plus the Python/numpy/paho baseline it prints
  beside it.
- baselines in the same run: one plain memcpy of the payload
  (``bytes(memoryview)``), and the same bytes copied once through a loopback
  TCP socket to the receiver process (the floor of any transport). Sending
  the 400 MB unchunked through the broker is impossible: MQTT's largest
  packet is 256 MiB (and mosquitto.conf allows 32 MiB).

Throughput is payload bytes per second in MB/s (1 MB = 10**6 bytes).

Run (bounded, as on the shared 2-core VM)::

    ulimit -v 16000000; timeout 900 .venv/bin/python bench/bench_chunking.py [--params N] [--limit BYTES]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import queue
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from edge_agent import chunking  # noqa: E402

TOPIC = "bench/chunks"


def _rss_mb() -> float:
    """Peak resident set size of this process so far, MB: VmHWM, which starts afresh at exec
    (ru_maxrss does not: a child would report its parent's peak from before the fork)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_now_mb() -> float:
    """Resident set size now, MB."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def receiver(port: int, mode: str, size: int) -> None:
    """Child process: receive once (mqtt: chunks through the broker; tcp: a plain socket copy), print JSON."""
    if mode == "tcp":
        import_rss = _rss_now_mb()
        srv = socket.create_server(("127.0.0.1", 0))
        print(json.dumps({"port": srv.getsockname()[1]}), flush=True)
        conn, _ = srv.accept()
        buf = np.empty(size, np.uint8)
        view, got = memoryview(buf), 0
        while got < size:
            n = conn.recv_into(view[got:], min(size - got, 1 << 20))
            if not n:
                break
            got += n
        done = time.time()
        ok = hashlib.sha256(buf).hexdigest()
        print(json.dumps({"done": done, "sha256": ok, "rss_mb": _rss_mb(), "base_rss_mb": import_rss}), flush=True)
        return
    r = chunking.Reassembler()
    result: dict = {}
    finished = threading.Event()

    def on_message(client, userdata, msg) -> None:
        try:
            if "manifest" not in result:
                r.begin(chunking.decode_manifest(msg.payload))
                result["manifest"] = True
                return
            out = r.add(chunking.decode_chunk(msg.payload))
            if out is not None:
                result.update(done=time.time(), sha256=hashlib.sha256(out).hexdigest())
                finished.set()
        except Exception as exc:  # report, do not kill paho's thread
            result["error"] = repr(exc)
            finished.set()

    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-receiver", protocol=paho.MQTTv5)
    c.on_message = on_message
    subscribed = threading.Event()
    c.on_subscribe = lambda *a: subscribed.set()
    c.connect("127.0.0.1", port)
    c.loop_start()
    c.subscribe(TOPIC, qos=1)
    subscribed.wait(30)
    import_rss = _rss_now_mb()  # connected, before the payload
    print(json.dumps({"ready": True}), flush=True)
    finished.wait(600)
    c.disconnect()
    c.loop_stop()
    print(json.dumps({**result, "rss_mb": _rss_mb(), "base_rss_mb": import_rss}), flush=True)


def _child(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)


def _line(p: subprocess.Popen) -> dict:
    return json.loads(p.stdout.readline())


def send_chunked(port: int, manifest: chunking.Manifest, pieces: list[memoryview]) -> tuple[float, int]:
    """Publish manifest + chunks at QoS 1 with a window; returns (start time, messages)."""
    out = chunking.Outgoing(manifest, pieces)
    acks: queue.Queue[int] = queue.Queue()  # PUBACKs, applied in this thread (a PUBACK can beat out.sent)
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-sender", protocol=paho.MQTTv5)
    c.on_publish = lambda client, userdata, mid, rc, props: acks.put(mid)
    c.connect("127.0.0.1", port)
    c.loop_start()
    t0 = time.time()
    early: set[int] = set()
    while not out.done:
        for i in out.due():
            out.sent(i, c.publish(TOPIC, out.message(i), qos=1).mid)
        early.add(acks.get(timeout=60))
        early = {mid for mid in early if not out.published(mid)}
    c.disconnect()
    c.loop_stop()
    return t0, manifest.count + 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=100_000_000)
    ap.add_argument("--limit", type=int, default=1024 * 1024, help="broker max_packet_size (chunks fit below it)")
    ap.add_argument("--receive", nargs=3, metavar=("PORT", "MODE", "SIZE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.receive:
        receiver(int(a.receive[0]), a.receive[1], int(a.receive[2]))
        return
    from aggregator.broker import LocalBroker

    rss0 = _rss_mb()
    arr = np.random.default_rng(0).random(a.params, dtype=np.float32)
    payload = memoryview(arr).cast("B")
    size = payload.nbytes
    mb = size / 1e6
    print(f"payload: {a.params:,} float32 parameters, {size:,} bytes; broker limit {a.limit:,} bytes")

    t = time.perf_counter()
    copy = bytes(payload)
    t_copy = time.perf_counter() - t
    del copy

    csize = chunking.chunk_size_for(a.limit)
    t = time.perf_counter()
    manifest, pieces = chunking.split(payload, csize, fed="bench", round=1, of="model")
    t_split = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(manifest.count):
        chunking.encode_chunk(chunking.Chunk("bench", 1, manifest.sha256, i, pieces[i]))
    t_encode = time.perf_counter() - t
    want = manifest.sha256.hex()

    # a plain loopback TCP copy of the same bytes to another process
    p = _child(["--receive", "0", "tcp", str(size)])
    port = _line(p)["port"]
    s = socket.create_connection(("127.0.0.1", port))
    t0 = time.time()
    s.sendall(payload)
    s.close()
    tcp = _line(p)
    p.wait(60)
    t_tcp = tcp["done"] - t0
    assert tcp["sha256"] == want

    with LocalBroker(overrides={"max_packet_size": str(a.limit), "max_queued_bytes": "0",
                                "max_queued_messages": "0"}) as b:
        p = _child(["--receive", str(b.port), "mqtt", str(size)])
        assert _line(p)["ready"]
        t0, messages = send_chunked(b.port, manifest, pieces)
        rx = _line(p)
        p.wait(60)
    assert "error" not in rx, rx
    assert rx["sha256"] == want
    t_mqtt = rx["done"] - t0
    sender_rss = _rss_mb()

    def row(name: str, seconds: float, note: str = "") -> None:
        print(f"  {name:<44} {seconds:8.3f} s {mb / seconds:9.0f} MB/s  {note}")

    print(f"chunks: {manifest.count} of {csize:,} bytes (+ manifest of {len(chunking.encode_manifest(manifest)):,} "
          f"bytes), {messages} QoS 1 messages, window {chunking.SEND_WINDOW}")
    row("memcpy (bytes(memoryview))", t_copy, "baseline")
    row("split: SHA-256 of every chunk + whole", t_split)
    row("encode every chunk message", t_encode)
    row("loopback TCP copy to another process", t_tcp, "baseline: the transport floor")
    row("mosquitto, chunked, reassembled + checked", t_mqtt, f"{t_mqtt / t_tcp:.1f}x the TCP copy")
    print(f"receiver peak RSS: {rx['rss_mb']:.0f} MB (before the payload {rx['base_rss_mb']:.0f} MB; payload "
          f"{mb:.0f} MB): {rx['rss_mb'] - rx['base_rss_mb']:.0f} MB for the reassembly")
    print(f"sender peak RSS: {sender_rss:.0f} MB (before the payload {rss0:.0f} MB)")


if __name__ == "__main__":
    main()
