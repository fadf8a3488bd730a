"""A private NATS server cluster speaking MQTT 3.1.1, for the tests and the broker benchmark.

The broker tier of deploy/scale.md ("Broker tier"): N nats-server nodes on
loopback (Debian's ``nats-server`` 2.9), each with its own client port,
cluster route port, monitoring port, JetStream store directory and an
``mqtt {}`` listener. Like :class:`~aggregator.broker.LocalBroker` it is a
development tool: anonymous, no TLS, loopback only. What it is for: running
fedmqtt with ``[broker] protocol = "3.1.1"`` across nodes, and killing a
node.

Known facts of nats-server 2.9.10 (FIELD-NOTES.md, and measured here) that
shape this file: each MQTT subscription of a session is a JetStream consumer;
with ``consumer_replicas: 1`` it lives on one node, which need not be the node
the client is connected to, and when that node dies the subscription
receives nothing any more (measured: the aggregator's ``update/+`` got 0 of
160 messages in 40 s) although the client's own connection is fine. So the
consumers are replicated like the streams (:data:`CONSUMER_REPLICAS`):
delivery then resumes 5-7 s after a node dies, nothing lost. New
subscriptions may be refused while a node is down (SUBACK 0x80): fedmqtt's
Connection asks again (edge_agent/mqtt.py SUBSCRIBE_RETRY_S). The first MQTT connection of an account takes ~2 s (JetStream
creates the MQTT streams), so :meth:`NatsCluster.start` makes it once;
messages above 8 MiB are not safe in the replicated store
(:data:`NATS_MAX_PACKET`).
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from edge_agent.config import BrokerConfig

from .broker import BrokerError, file_tail, find_binary, free_port

log = logging.getLogger(__name__)

# Starting 3 nodes, forming routes and electing a JetStream meta leader takes
# 1-3 s on loopback; the bound covers a loaded 2-core machine.
START_TIMEOUT_S = 30.0
# The first MQTT CONNECT creates the account's JetStream streams (~2 s measured).
WARM_UP_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
# The packet limit to give fedmqtt on this tier ([broker] max_packet_size): a
# 32 MiB message corrupted 2.9.10's replicated store twice, 8 and 16 MiB were
# fine; 8 MiB keeps a margin (chunks are then at most 8 MiB - 4 KiB).
NATS_MAX_PACKET = 8 * 1024 * 1024
# mqtt { consumer_replicas }: 3, every node holds every consumer (see the module docstring:
# with 1, the death of the node that holds a subscription's consumer silences it for good).
CONSUMER_REPLICAS = 3
# Name of the cluster (routes only join nodes of the same name).
CLUSTER_NAME = "fedmqtt"


def find_nats_server() -> str | None:
    """Path of the nats-server binary, or None."""
    return find_binary("nats-server")


@dataclass
class NatsNode:
    """One nats-server of the cluster and its ports."""

    name: str
    client_port: int
    cluster_port: int
    mqtt_port: int
    http_port: int
    store_dir: Path
    conf: Path
    log_path: Path
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def render_node_config(node: NatsNode, routes: list[int], consumer_replicas: int = CONSUMER_REPLICAS) -> str:
    """The nats-server config of one node: loopback ports, its own JetStream store, an MQTT listener."""
    route_urls = ", ".join(f"nats-route://127.0.0.1:{p}" for p in routes)
    return (
        f"server_name: {node.name}\n"
        f"listen: 127.0.0.1:{node.client_port}\n"
        f"http: 127.0.0.1:{node.http_port}\n"
        f"jetstream {{ store_dir: {json.dumps(str(node.store_dir))} }}\n"
        f"cluster {{\n  name: {CLUSTER_NAME}\n  listen: 127.0.0.1:{node.cluster_port}\n"
        f"  routes: [{route_urls}]\n}}\n"
        # consumer_replicas: CONSUMER_REPLICAS (why: the module docstring)
        f"mqtt {{\n  listen: 127.0.0.1:{node.mqtt_port}\n  consumer_replicas: {consumer_replicas}\n}}\n"
    )


class NatsCluster:
    """``size`` nats-server nodes in one cluster on 127.0.0.1, each with an MQTT listener."""

    def __init__(self, size: int = 3, workdir: str | Path | None = None,
                 consumer_replicas: int = CONSUMER_REPLICAS) -> None:
        binary = find_nats_server()
        if binary is None:
            raise BrokerError("nats-server is not installed: scripts/setup.sh installs it with apt-get "
                              "(by hand: apt-get install nats-server)")
        self.binary = binary
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="fedmqtt-nats-")
        self.workdir = Path(workdir) if workdir else Path(self._tmp.name)
        self.consumer_replicas = consumer_replicas
        self.nodes: list[NatsNode] = []
        for i in range(1, size + 1):
            store = self.workdir / f"n{i}" / "jetstream"
            store.mkdir(parents=True, exist_ok=True)
            self.nodes.append(NatsNode(f"n{i}", free_port(), free_port(), free_port(), free_port(), store,
                                       self.workdir / f"n{i}" / "nats.conf", self.workdir / f"n{i}" / "nats.log"))

    # -- addresses --------------------------------------------------------------

    def broker_config(self, index: int, failover: bool = True, **kw) -> BrokerConfig:
        """fedmqtt's [broker] for node ``index`` (0-based): MQTT 3.1.1, 8 MiB packets, the other nodes as failover."""
        node = self.nodes[index]
        others = [f"127.0.0.1:{n.mqtt_port}" for n in self.nodes[index + 1:] + self.nodes[:index]] if failover else []
        return BrokerConfig(host="127.0.0.1", port=node.mqtt_port, protocol="3.1.1",
                            max_packet_size=NATS_MAX_PACKET, failover=others, **kw)

    # -- life cycle -------------------------------------------------------------

    def start(self) -> "NatsCluster":
        """Start every node; return once routes are formed, JetStream is up and MQTT answers on each node."""
        for node in self.nodes:
            self.start_node(node, wait=False)
        deadline = time.monotonic() + START_TIMEOUT_S
        for node in self.nodes:
            self._wait_ready(node, deadline)
        self.warm_up()
        return self

    def start_node(self, node: NatsNode, wait: bool = True) -> None:
        """(Re)start one node with its config and store (a restart keeps its JetStream data)."""
        routes = [n.cluster_port for n in self.nodes]
        node.conf.write_text(render_node_config(node, routes, self.consumer_replicas))
        log_fh = node.log_path.open("ab")
        try:
            node.proc = subprocess.Popen([self.binary, "-c", str(node.conf)], stdout=log_fh,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log_fh.close()
        if wait:
            self._wait_ready(node, time.monotonic() + START_TIMEOUT_S)

    def _wait_ready(self, node: NatsNode, deadline: float) -> None:
        want_routes = len(self.nodes) - 1 - sum(1 for n in self.nodes if n is not node and not n.alive)
        problem = "not started"
        while time.monotonic() < deadline:
            if not node.alive:
                raise BrokerError(f"nats-server {node.name} exited with {node.proc.returncode if node.proc else '?'}: "
                                  f"{self.log_tail(node)}")
            try:
                routes = self._monitor(node, "routez").get("num_routes", 0)
                healthy = self._monitor(node, "healthz").get("status") == "ok"
                with socket.create_connection(("127.0.0.1", node.mqtt_port), timeout=0.5):
                    pass
                if routes >= want_routes and healthy:
                    return
                problem = f"{routes}/{want_routes} routes, healthz {'ok' if healthy else 'not ok'}"
            except (OSError, ValueError) as exc:
                problem = str(exc)
            time.sleep(0.1)
        raise BrokerError(f"nats-server {node.name} not ready within {START_TIMEOUT_S:g}s ({problem}): "
                          f"{self.log_tail(node)}")

    @staticmethod
    def _monitor(node: NatsNode, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/{path}", timeout=2) as r:
            return json.loads(r.read())

    def warm_up(self) -> None:
        """One MQTT 3.1.1 connection to every node: JetStream creates its MQTT streams now, not in a test."""
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        for node in self.nodes:
            c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"fedmqtt-warm-up-{node.name}",
                            protocol=paho.MQTTv311)
            ok: list = []
            c.on_connect = lambda _c, _u, _f, rc, _p: ok.append(rc)
            deadline = time.monotonic() + WARM_UP_TIMEOUT_S
            try:
                c.connect("127.0.0.1", node.mqtt_port)
                while not ok and time.monotonic() < deadline:
                    c.loop(timeout=0.1)
                if not ok or ok[0].is_failure:
                    raise BrokerError(f"nats-server {node.name}: no MQTT CONNACK within {WARM_UP_TIMEOUT_S:g}s "
                                      f"({ok[0] if ok else 'none'}): {self.log_tail(node)}")
                c.disconnect()
                c.loop(timeout=0.1)
            finally:
                sock = c.socket()
                if sock is not None:
                    sock.close()

    def kill(self, index: int) -> None:
        """SIGKILL node ``index``, as a crash would."""
        node = self.nodes[index]
        if node.alive:
            log.info("killing nats-server %s (pid %d)", node.name, node.proc.pid)
            node.proc.kill()
            node.proc.wait()

    def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL if one hangs)."""
        for node in self.nodes:
            if node.alive:
                node.proc.send_signal(signal.SIGTERM)
        for node in self.nodes:
            if node.proc is None:
                continue
            try:
                node.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait()

    def log_tail(self, node: NatsNode, chars: int = 2000) -> str:
        return file_tail(node.log_path, chars)

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> "NatsCluster":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()
