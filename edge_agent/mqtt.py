"""The MQTT adapter: one selector thread drives any number of paho clients.

This is the only module that touches sockets. A :class:`Loop` runs in one
thread and owns every paho client registered with it, using paho's
socket-level API (``loop_read``/``loop_write``/``loop_misc``) the way paho's
own ``loop_select`` example does, so a simulation of 100 agents costs one
thread, not 100. A :class:`Connection` is one client: it subscribes in
``on_connect`` (subscriptions are not restored on reconnect), reconnects with
exponential backoff, and hands every message to its handler. Exceptions in
handlers are caught and logged: paho must never see them.

Other threads talk to the loop only through :meth:`Loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import select
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

from .config import BrokerConfig

log = logging.getLogger(__name__)

# Outgoing messages paho may hold per client before publish() refuses more.
# Unbounded by default; an agent publishes one update per round and a status,
# the aggregator a handful per round, so 1000 only matters when the broker is
# gone for a long time, and then refusing is better than growing without end.
MAX_QUEUED_MESSAGES = 1000
# Reconnect backoff: start fast for a broker restart, cap so a fleet of
# devices does not hammer a broker that is down for long.
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 30.0
# CONNACK / DISCONNECT reason codes (MQTT 5, section 3.2.2.2 and 3.14.2.1)
# that retrying cannot mend: the configuration (credentials, client id) is
# wrong, or another client took this client id.
LOGIN_REFUSED = {133: "client identifier not valid", 134: "bad user name or password", 135: "not authorized",
                 138: "banned", 140: "bad authentication method"}
SESSION_TAKEN_OVER = 142
# CONNACK "unsupported protocol version": an MQTT 3.1.1-only broker (a NATS
# server) answers an MQTT 5 CONNECT so (mapped by paho from 3.1.1's code 1).
UNSUPPORTED_PROTOCOL = 132
# mosquitto 2.0 does not send SESSION_TAKEN_OVER: it just closes the old
# connection. A client whose connections end within seconds of being
# accepted, several times in a row, is sharing its client id with another
# (a network that fails does not let every reconnect succeed at once).
# But a broker restarted three times in a row ends connections the same way,
# so that is only a suspicion: the client backs off (the two clones then trade
# the connection once a back-off, not every second), logs an error naming the
# id, and tells its handler (an agent reports it in its status). A session
# that outlives SHORT_SESSION_S clears the suspicion.
SHORT_SESSION_S = 5.0
TAKEOVERS_SUSPECTED_AFTER = 3
TAKEOVER_BACKOFF_S = 60.0
# Bytes a PUBLISH adds to topic and payload: fixed header (<= 5), topic length (2),
# packet id (2), property length (<= 4); user properties are counted exactly.
PUBLISH_OVERHEAD = 13
# A refused subscription is asked for again after this long (a clustered broker
# that lost a node needs seconds to place new consumers; NATS 2.9 times out a
# JetStream request after 4 s, so a shorter retry would only pile them up).
SUBSCRIBE_RETRY_S = 5.0
# loop_misc handles keepalive pings and timeouts; once a second is plenty.
MISC_INTERVAL_S = 1.0
# Queued callbacks run per loop pass, so long work (training) never starves
# the sockets of the other clients for more than one job.
JOBS_PER_PASS = 1
# On stop, how long to keep serving sockets so that every QoS 1 publish is
# acknowledged before DISCONNECT. Closing a socket with unread PUBACKs in it
# makes the kernel send RST, and the broker may then drop publishes it had
# received but not yet read (seen: the final "done" task lost). Loopback
# needs milliseconds; the bound covers a slow link without hanging a stop.
CLOSE_FLUSH_S = 5.0
# Group commit (manual_ack): the QoS 1 messages handled in one read pass are
# acknowledged together, after the handler's flush() made them durable with
# one fsync. A read pass goes on while the socket has more to read, up to
# these bounds, then flushes and acks. The broker's bound is the client's
# in-flight window: mosquitto 2.0 sends a client that announces no Receive
# Maximum at most 20 unacknowledged QoS 1 messages (measured), so the
# aggregator announces 65,535 (aggregator/service.py RECEIVE_MAXIMUM; the
# held-back acks of a chunked update need it). Every message of a batch waits for the
# handling of all of them (decode, fold) before its ack, and the sockets of
# other clients and the timers wait for the pass: 100 messages is about one
# fleet round and a few ms of handling for small models. The byte bound: an
# fsync's time grows with the bytes it writes back, and batching model-sized
# updates saves little (writing back 4 MB dwarfs an fsync's fixed cost)
# while delaying acks and holding the loop for the whole batch.
MAX_ACK_BATCH = 100
MAX_ACK_BATCH_BYTES = 16 * 1024 * 1024


# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH:
# the certificate does not name the host (or address) we dialled.
X509_NAME_MISMATCH = (62, 64)


def _code(reason_code) -> int:
    """The numeric value of a paho ReasonCode (or of a plain int)."""
    return int(getattr(reason_code, "value", reason_code) or 0)


@dataclass
class Publish:
    """Action: publish ``payload`` on ``topic``.

    ``user_properties`` become MQTT v5 user properties and ``content_type``
    the v5 content type: metadata that travels beside a payload that is not
    ours to wrap (raw ONNX bytes).
    """

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    user_properties: tuple[tuple[str, str], ...] = ()
    content_type: str = ""


class Handler(Protocol):
    """What a Connection needs from the code it serves."""

    def subscriptions(self) -> list[str]: ...

    def on_connected(self, conn: "Connection") -> None: ...

    def on_message(self, conn: "Connection", topic: str, payload: bytes, props: dict[str, str]) -> None: ...

    # Optional: ``on_fatal(conn, problem)`` when the broker says retrying cannot help (see
    # :attr:`Connection.fatal`); without it the loop is stopped.
    # Optional: ``on_too_large(conn, msg, size)`` when a publish was refused because it
    # exceeds the broker's maximum packet size (``conn.max_packet_size``).
    # Optional: ``on_published(conn, mid)`` when the broker acknowledged a QoS 1 publish
    # (the mid that :meth:`Connection.publish_tracked` returned).
    # Optional: ``on_takeover_suspected(conn, problem)`` / ``on_takeover_cleared(conn)``
    # (see SHORT_SESSION_S).
    # Optional, with manual_ack: ``flush(conn)``, called before the acks of the messages
    # handled since the last call are sent: make durable what their handling wrote (one
    # fsync for the batch). If it raises, none of them is acknowledged.


class Loop:
    """A single-threaded event loop for paho clients, jobs and timers."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.connections: list[Connection] = []
        self._jobs: deque[Callable[[], None]] = deque()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._incoming: deque[Callable[[], None]] = deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopping = False
        self.thread: threading.Thread | None = None
        self._at_shutdown: list[Callable[[], None]] = []

    # -- scheduling -----------------------------------------------------------

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Queue ``fn`` to run in the loop thread (call from the loop thread)."""
        self._jobs.append(fn)

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` in the loop thread after ``delay`` seconds."""
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), fn))

    def call_every(self, interval: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` every ``interval`` seconds until the loop stops."""

        def again() -> None:
            _guard(fn, "periodic job")
            self.call_later(interval, again)

        self.call_later(interval, again)

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        """Queue ``fn`` from any thread and wake the loop."""
        with self._lock:
            self._incoming.append(fn)
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # the loop is already awake (buffer full) or closed

    def stop(self) -> None:
        """Ask the loop to finish (thread-safe); connections are closed cleanly."""
        self.call_soon_threadsafe(self._request_stop)

    def _request_stop(self) -> None:
        self._stopping = True

    def at_shutdown(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in the loop thread once the loop has stopped and its connections are closed."""
        self._at_shutdown.append(fn)

    # -- running --------------------------------------------------------------

    def start(self, name: str = "mqtt-loop") -> threading.Thread:
        """Run the loop in a daemon thread and return it."""
        self.thread = threading.Thread(target=self.run, name=name, daemon=True)
        self.thread.start()
        return self.thread

    def run(self) -> None:
        """Run until :meth:`stop`; then disconnect every client."""
        next_misc = time.monotonic()
        try:
            while not self._stopping:
                now = time.monotonic()
                timeout = 0.0 if self._jobs else max(0.0, min(next_misc, self._next_timer()) - now)
                self._serve(self.selector.select(timeout))
                with self._lock:
                    while self._incoming:
                        self._jobs.append(self._incoming.popleft())
                now = time.monotonic()
                while self._timers and self._timers[0][0] <= now:
                    _, _, fn = heapq.heappop(self._timers)
                    _guard(fn, "timer")
                for _ in range(min(JOBS_PER_PASS, len(self._jobs))):
                    _guard(self._jobs.popleft(), "job")
                if now >= next_misc:
                    for conn in self.connections:
                        conn.client.loop_misc()
                    next_misc = now + MISC_INTERVAL_S
        finally:
            self._shutdown()

    def _next_timer(self) -> float:
        return self._timers[0][0] if self._timers else float("inf")

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _shutdown(self) -> None:
        for conn in self.connections:
            conn.begin_close()
        # Serve the sockets until every QoS 1 publish is acknowledged (bounded).
        deadline = time.monotonic() + CLOSE_FLUSH_S
        while time.monotonic() < deadline and any(c.unacknowledged() for c in self.connections):
            self._serve(self.selector.select(0.05))
        for conn in self.connections:
            conn.finish_close()
        # paho closes each socket once its DISCONNECT is written; give that a moment.
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and any(c.client.want_write() for c in self.connections):
            self._serve(self.selector.select(0.05))
        self.selector.close()
        self._wake_r.close()
        self._wake_w.close()
        for fn in self._at_shutdown:
            _guard(fn, "shutdown hook")

    def _serve(self, events: list) -> None:
        for key, mask in events:
            if key.data is None:
                self._drain_wakeups()
                continue
            conn: Connection = key.data
            if mask & selectors.EVENT_READ:
                try:
                    for _ in range(MAX_ACK_BATCH):  # bounded: the other sockets and the timers wait meanwhile
                        conn.client.loop_read()
                        # TLS may hold decrypted bytes the socket no longer signals: drain them.
                        sock = conn.client.socket()
                        while sock is not None and getattr(sock, "pending", None) is not None and sock.pending() > 0:
                            conn.client.loop_read()
                            sock = conn.client.socket()
                        # Group commit: while handled messages wait for their ack, read
                        # on as long as more has arrived.
                        if not conn.batch_open() or not _readable(sock):
                            break
                finally:
                    conn.send_acks()  # after the handler's flush(): one fsync for the pass
            if mask & selectors.EVENT_WRITE:
                conn.client.loop_write()


def _readable(sock) -> bool:
    """Whether ``sock`` has bytes to read right now (never blocks)."""
    if sock is None:
        return False
    if getattr(sock, "pending", None) is not None and sock.pending() > 0:
        return True
    try:
        if hasattr(select, "poll"):  # no FD_SETSIZE limit, unlike select()
            p = select.poll()
            p.register(sock, select.POLLIN)
            return bool(p.poll(0))
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):  # closed under us
        return False


def _guard(fn: Callable[[], None], what: str) -> None:
    try:
        fn()
    except Exception:
        log.exception("%s failed", what)


class Connection:
    """One paho MQTT client (v5, or 3.1.1 with ``[broker] protocol = "3.1.1"``) driven by a :class:`Loop`.

    In 3.1.1 mode ``clean_start`` becomes the CONNECT's clean session flag,
    ``session_expiry_s`` and ``receive_maximum`` are not sent (3.1.1 has no
    CONNECT properties: a persistent session lasts until the broker drops
    it), publishes go without properties, and ``max_packet_size`` stays 0
    (nothing is announced; ``[broker] max_packet_size`` is the limit).
    """

    def __init__(
        self,
        loop: Loop,
        broker: BrokerConfig,
        client_id: str,
        handler: Handler,
        will: Publish | None = None,
        clean_start: bool = True,
        session_expiry_s: int = 0,
        manual_ack: bool = False,
        receive_maximum: int = 0,
        max_queued: int = MAX_QUEUED_MESSAGES,
    ) -> None:
        self.loop = loop
        self.broker = broker
        self.client_id = client_id
        self.handler = handler
        self.connected = False
        self._closing = False
        self._backoff = RECONNECT_MIN_S
        self._session_expiry_s = session_expiry_s
        self.will = will
        # QoS 1 publishes not yet acknowledged, by message id: dropped on their
        # PUBACK (on_publish), so a burst of N publishes (one notice per selected
        # agent) costs O(N), not a rescan of everything in flight per publish.
        self._inflight: dict[int, paho.MQTTMessageInfo] = {}
        # Set when retrying cannot help (refused login, client id taken over):
        # one line saying what to fix. The connection then stops reconnecting.
        self.fatal: str | None = None
        # The broker's packet size limit from CONNACK (0: none announced).
        self.max_packet_size = 0
        self.refused_too_large = 0
        self._answered = False  # a CONNACK arrived since the socket opened
        self._connected_at = 0.0
        self._short_sessions = 0  # consecutive connections that the broker ended within SHORT_SESSION_S
        self.suspected_takeover: str | None = None  # why we think another client shares our id
        # manual_ack: a QoS 1 message is acknowledged only after the handler
        # returned and its flush() (if any) made what it wrote durable; the
        # messages of one read pass share that flush (group commit).
        self.manual_ack = manual_ack
        self._unacked: list[tuple[int, int]] = []  # (mid, qos) handled, waiting for flush() and the ack
        self._unacked_bytes = 0
        # Acks the handler holds back past the read pass (hold_ack/release_acks):
        # the chunks of a payload are acknowledged only once the whole payload is durable.
        self._current: tuple[int, int] | None = None
        self._held_current = False
        self._pending_subs: dict[int, list[str]] = {}  # SUBSCRIBE mid -> topics, until its SUBACK
        # [broker] protocol: MQTT 5, or 3.1.1 for a broker without it (docs/PROTOCOL.md §1.1). In 3.1.1
        # clean start + session expiry become clean_session: a persistent session (clean_start
        # False) then has no expiry but the broker's own limits, and CONNECT carries no properties.
        self.mqtt5 = broker.mqtt5
        self._addresses = broker.addresses()
        self._address = 0  # index into _addresses of the node we connect to
        self._stripped_warned = False
        if self.mqtt5:
            c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5,
                            manual_ack=manual_ack)
        else:
            c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311,
                            clean_session=clean_start, manual_ack=manual_ack)
        c.max_queued_messages_set(max_queued)
        c.enable_logger(logging.getLogger(f"{__name__}.paho"))  # packet log at DEBUG (-vv)
        if broker.username:
            c.username_pw_set(broker.username, broker.secret() or None)
        if broker.tls:
            # Server certificate and host name are always verified; a client
            # certificate is presented when configured.
            c.tls_set(
                ca_certs=broker.ca_file or None,
                certfile=broker.cert_file or None,
                keyfile=broker.key_file or None,
            )
        if will is not None:
            c.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_socket_open = self._on_socket_open
        c.on_socket_close = self._on_socket_close
        c.on_socket_register_write = self._on_register_write
        c.on_socket_unregister_write = self._on_unregister_write
        props = None
        if self.mqtt5 and (session_expiry_s or receive_maximum):
            props = Properties(PacketTypes.CONNECT)
            if session_expiry_s:
                props.SessionExpiryInterval = session_expiry_s
            if receive_maximum:
                # Without it mosquitto sends a v5 client at most max_inflight_messages (20)
                # unacknowledged QoS 1 messages: a receiver that holds acks (chunks) needs more.
                props.ReceiveMaximum = receive_maximum
        self._connect_kwargs = {"clean_start": clean_start, "properties": props} if self.mqtt5 else {}
        c.connect_async(broker.host, broker.port, broker.keepalive, **self._connect_kwargs)
        self.client = c
        loop.connections.append(self)

    def open(self) -> None:
        """Start connecting (from the loop thread); retries until it works or the loop stops."""
        self.loop.call_soon(self._try_connect)

    def publish(self, msg: Publish) -> bool:
        """Queue a publish (from the loop thread); False when it is refused.

        A message larger than the broker's announced maximum packet size is
        refused here with a log line: sent anyway, the broker would
        disconnect us and paho would resend it on every reconnect, forever.
        """
        return self.publish_tracked(msg) is not None

    def publish_tracked(self, msg: Publish) -> int | None:
        """Like :meth:`publish`, but returns the message id (None when refused).

        The handler's optional ``on_published(conn, mid)`` hears when the
        broker acknowledged it (QoS 1); paho resends it after a reconnect
        until then.
        """
        size = self.packet_size(msg)
        if self.max_packet_size and size > self.max_packet_size:
            self.refused_too_large += 1
            log.error("%s: not publishing %d bytes to %s: the broker's maximum packet size is %d bytes",
                      self.client_id, size, msg.topic, self.max_packet_size)
            self._notify("on_too_large", msg, size)
            return None
        props = None
        if (msg.user_properties or msg.content_type) and not self.mqtt5:
            # MQTT 3.1.1 has no properties. Signatures are refused at config time
            # ([security] with protocol 3.1.1); what remains is metadata a reader can do
            # without (model/onnx carries it inside the model too, docs/PROTOCOL.md §3.6).
            if not self._stripped_warned:
                self._stripped_warned = True
                log.info("%s: MQTT 3.1.1: publishing %s without its MQTT 5 properties (%s)", self.client_id,
                         msg.topic, ", ".join([k for k, _ in msg.user_properties] +
                                              (["content type"] if msg.content_type else [])))
        elif msg.user_properties or msg.content_type:
            props = Properties(PacketTypes.PUBLISH)
            if msg.user_properties:
                props.UserProperty = list(msg.user_properties)
            if msg.content_type:
                props.ContentType = msg.content_type
        info = self.client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain, properties=props)
        if msg.qos > 0 and info.rc == paho.MQTT_ERR_SUCCESS:
            self._inflight[info.mid] = info
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            log.warning("%s: publish to %s refused: %s", self.client_id, msg.topic, paho.error_string(info.rc))
            return None
        return info.mid

    def subscribe(self, topics: list[str]) -> None:
        """Subscribe at QoS 1 now (from the loop thread); while disconnected nothing is sent,
        so the handler's ``subscriptions()`` must name these topics for the next connection."""
        if topics and self.connected:
            self._subscribe(list(topics))

    def _subscribe(self, topics: list[str]) -> None:
        """SUBSCRIBE at QoS 1, remembering the topics until the SUBACK says how each went."""
        rc, mid = self.client.subscribe([(t, 1) for t in topics])
        if rc == paho.MQTT_ERR_SUCCESS and mid is not None:
            self._pending_subs[mid] = topics

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        try:
            topics = self._pending_subs.pop(mid, [])
            refused = [(t, rc) for t, rc in zip(topics, reason_codes) if getattr(rc, "is_failure", False)]
            if not refused:
                return
            failed = [t for t, _ in refused]
            # A broker may refuse a subscription for a while (a NATS cluster with a node down
            # answers 0x80 when it cannot create the JetStream consumer): without it we would
            # wait forever for messages that never come, so ask again.
            log.warning("%s: the broker refused the subscription to %s (%s); asking again in %.0f s",
                        self.client_id, ", ".join(failed), refused[0][1], SUBSCRIBE_RETRY_S)
            connected_at = self._connected_at

            def again() -> None:
                if self.connected and self._connected_at == connected_at and not self._closing:
                    self._subscribe(failed)

            self.loop.call_later(SUBSCRIBE_RETRY_S, again)
        except Exception:
            log.exception("%s: on_subscribe failed", self.client_id)

    def unsubscribe(self, topics: list[str]) -> None:
        """Unsubscribe now (from the loop thread); nothing to do while disconnected."""
        if topics and self.connected:
            self.client.unsubscribe(list(topics))

    def packet_size(self, msg: Publish) -> int:
        """Bytes of the PUBLISH packet that carries ``msg`` (an upper bound)."""
        if not self.mqtt5:
            return PUBLISH_OVERHEAD + len(msg.topic.encode()) + len(msg.payload)  # 3.1.1: no properties sent
        props = sum(5 + len(k.encode()) + len(v.encode()) for k, v in msg.user_properties)
        if msg.content_type:
            props += 3 + len(msg.content_type.encode())
        return PUBLISH_OVERHEAD + len(msg.topic.encode()) + len(msg.payload) + props

    def close(self) -> None:
        """Disconnect cleanly at once (see :meth:`Loop.stop` for the graceful path)."""
        self.begin_close()
        self.finish_close()

    def begin_close(self) -> None:
        """Stop reconnecting and announce the departure.

        A clean DISCONNECT makes the broker discard the last will, so the will
        (e.g. a retained "offline" status) is published explicitly here:
        others must learn we left whether we crashed or were stopped.
        """
        self._closing = True
        if self.connected and self.will is not None:
            self.publish(self.will)

    def unacknowledged(self) -> int:
        """QoS 1 publishes the broker has not acknowledged yet (0 when disconnected)."""
        if not self.connected:
            return 0
        self._inflight = {m: i for m, i in self._inflight.items() if not i.is_published()}
        return len(self._inflight)

    def abort(self) -> None:
        """Drop the connection without DISCONNECT and stop reconnecting, as a crashed device would
        (from the loop thread): the broker publishes our last will. For tests and drills."""
        self._closing = True
        sock = self.client.socket()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # paho notices on its next read: the connection is lost
            except OSError:
                pass

    def finish_close(self) -> None:
        """Send DISCONNECT."""
        self._closing = True
        if self.connected:
            self.client.disconnect()

    # -- connection management ------------------------------------------------

    def _try_connect(self) -> None:
        if self._closing:
            return
        host, port = self.address
        try:
            self.client.reconnect()
        except ssl.SSLCertVerificationError as exc:
            # Not a network hiccup: we do not trust this broker (wrong ca_file,
            # a host name the certificate does not name, or someone in the
            # middle). Say so loudly; keep retrying in case the operator
            # fixes the certificate.
            if exc.verify_code in X509_NAME_MISMATCH:
                log.error("%s: the broker's TLS certificate is not valid for host name %r (%s); connect with a "
                          "name the certificate carries ([broker] host)", self.client_id, host,
                          exc.verify_message or exc)
            else:
                log.error("%s: the broker's TLS certificate is not trusted (%s); check [broker] ca_file = %r",
                          self.client_id, exc.verify_message or exc, self.broker.ca_file)
            self._schedule_reconnect()
        except ssl.SSLError as exc:
            # e.g. WRONG_VERSION_NUMBER: TLS spoken to a port that does not.
            log.error("%s: TLS handshake with %s:%s failed (%s); if this port does not use TLS, set [broker] tls = "
                      "false or use the broker's TLS port", self.client_id, host, port,
                      exc.reason or exc)
            self._schedule_reconnect()
        except ConnectionResetError as exc:
            if self.broker.tls:
                # A plain MQTT listener resets a TLS ClientHello it cannot parse.
                log.error("%s: %s:%s reset the TLS handshake (%s); if this port does not use TLS, set [broker] tls "
                          "= false or use the broker's TLS port", self.client_id, host, port,
                          exc)
            else:
                log.info("%s: cannot reach broker %s:%s (%s); retry in %.1fs",
                         self.client_id, host, port, exc, self._backoff)
            self._schedule_reconnect()
        except (OSError, paho.WebsocketConnectionError) as exc:
            log.info("%s: cannot reach broker %s:%s (%s); retry in %.1fs",
                     self.client_id, host, port, exc, self._backoff)
            self._schedule_reconnect()

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) of the broker node this connection uses or tries next."""
        return self._addresses[self._address]

    def _schedule_reconnect(self) -> None:
        if self._closing:
            return
        # With [broker] failover, each retry goes to the next node of the cluster: the node
        # we lost may be down for good. The backoff grows once per round of the list, so
        # a live node is reached within one backoff of the loss.
        wrapped = True
        if len(self._addresses) > 1:
            self._address = (self._address + 1) % len(self._addresses)
            wrapped = self._address == 0
            host, port = self.address
            # connect_async only records where to connect (and closes a socket already lost);
            # the queued and in-flight messages stay for the next connection.
            self.client.connect_async(host, port, self.broker.keepalive, **self._connect_kwargs)
            log.info("%s: next attempt to %s:%s", self.client_id, *self.address)
        self.loop.call_later(self._backoff, self._try_connect)
        if wrapped:
            self._backoff = min(self._backoff * 2, RECONNECT_MAX_S)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        try:
            self._answered = True
            if reason_code.is_failure:
                code = _code(reason_code)
                if code in LOGIN_REFUSED:
                    who = f"user {self.broker.username!r}" if self.broker.username else "an anonymous login"
                    self._fail(f"the broker refused {who} ({LOGIN_REFUSED[code]}): check [broker] username and "
                               f"password/password_file (or the client certificate, cert_file/key_file)")
                    return
                if code == UNSUPPORTED_PROTOCOL:
                    other = "3.1.1" if self.mqtt5 else "5"
                    self._fail(f"the broker at {self.address[0]}:{self.address[1]} does not speak MQTT "
                               f"{self.broker.protocol} (it answered 'unsupported protocol version'): set [broker] "
                               f"protocol = \"{other}\" (a NATS server speaks only 3.1.1; docs/PROTOCOL.md §1.1)")
                    return
                log.error("%s: broker refused the connection: %s", self.client_id, reason_code)
                return  # paho closes the socket; _on_disconnect schedules the retry
            self.connected = True
            self._connected_at = connected_at = time.monotonic()
            self.loop.call_later(SHORT_SESSION_S, lambda: self._session_lasted(connected_at))
            self._backoff = RECONNECT_MIN_S
            self.max_packet_size = int(getattr(properties, "MaximumPacketSize", 0) or 0)
            subs = self.handler.subscriptions()
            if subs:
                self._pending_subs.clear()  # SUBACKs of an earlier connection never come
                self._subscribe(subs)
            self.handler.on_connected(self)
        except Exception:
            log.exception("%s: on_connect handler failed", self.client_id)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        try:
            was, answered = self.connected, self._answered
            self.connected = False
            self._answered = False
            if self._closing:
                return
            if _code(reason_code) == SESSION_TAKEN_OVER:
                # Another client connected with our client id: a second device
                # with the same id (a cloned SD card), or a second copy of this
                # service. Reconnecting would take its connection in turn, forever.
                self._fail(f"another client connected with client id {self.client_id!r} and took over the session: "
                           "two devices (or two services) share this id; give each its own")
                return
            if was:
                short = time.monotonic() - self._connected_at < SHORT_SESSION_S
                self._short_sessions = self._short_sessions + 1 if short else 0
                if self._short_sessions >= TAKEOVERS_SUSPECTED_AFTER:
                    problem = (f"the broker closed this connection {self._short_sessions} times within seconds of "
                               f"accepting it: most likely another client uses client id {self.client_id!r} (two "
                               "devices, or two services, share this id; give each its own), or the broker keeps "
                               f"restarting; retrying in {TAKEOVER_BACKOFF_S:.0f} s")
                    log.error("%s: %s", self.client_id, problem)
                    self.suspected_takeover = problem
                    self._notify("on_takeover_suspected", problem)
                    self._backoff = max(self._backoff, TAKEOVER_BACKOFF_S)
                    self._schedule_reconnect()
                    return
                log.warning("%s: disconnected (%s); reconnecting", self.client_id, reason_code)
            elif not answered and not self.broker.tls:
                log.warning("%s: %s:%s closed the connection before answering; if that port needs TLS, set "
                            "[broker] tls = true (and ca_file)", self.client_id, *self.address)
            self._schedule_reconnect()
        except Exception:
            log.exception("%s: on_disconnect failed", self.client_id)

    def _session_lasted(self, connected_at: float) -> None:
        """A connection outlived SHORT_SESSION_S: not a takeover flap (any more)."""
        if not self.connected or self._connected_at != connected_at:
            return
        self._short_sessions = 0
        if self.suspected_takeover is not None:
            self.suspected_takeover = None
            self._notify("on_takeover_cleared")

    def _fail(self, problem: str) -> None:
        """Stop for good: retrying cannot mend this (a configuration error)."""
        self.fatal = problem
        self._closing = True
        log.error("%s: %s", self.client_id, problem)
        if not self._notify("on_fatal", problem):
            self.loop.stop()

    def _notify(self, hook: str, *args) -> bool:
        """Call the handler's optional ``hook(self, *args)``; False when it has none."""
        fn = getattr(self.handler, hook, None)
        if fn is None:
            return False
        fn(self, *args)
        return True

    def _on_message(self, client, userdata, msg) -> None:
        try:
            props = getattr(msg, "properties", None)
            user = dict(getattr(props, "UserProperty", None) or [])  # MQTT v5 user properties (signatures)
            self._current, self._held_current = (msg.mid, msg.qos), False
            self.handler.on_message(self, msg.topic, msg.payload, user)
        except Exception:
            # Acknowledged anyway below: a message that crashes the handler
            # would crash it again on every redelivery.
            log.exception("%s: handling a message on %s failed", self.client_id, msg.topic)
            self._held_current = False
        self._current = None
        if self._held_current:
            return  # the handler acknowledges it later (release_acks)
        if self.manual_ack and msg.qos > 0:
            # Not yet: at the end of this read pass, after the handler's flush().
            self._unacked.append((msg.mid, msg.qos))
            self._unacked_bytes += len(msg.payload)
            if len(self._unacked) >= MAX_ACK_BATCH or self._unacked_bytes >= MAX_ACK_BATCH_BYTES:
                self.send_acks()

    def hold_ack(self) -> tuple[int, int] | None:
        """From ``on_message`` with manual_ack: do not acknowledge the message being handled
        at the end of this read pass; returns its key for :meth:`release_acks` (None: nothing to hold)."""
        if not self.manual_ack or self._current is None or self._current[1] == 0:
            return None
        self._held_current = True
        return self._current

    def release_acks(self, keys: list[tuple[int, int]]) -> None:
        """Acknowledge held messages with the next batch, after the handler's flush().

        Outside a read pass (a timer) call :meth:`send_acks` afterwards. A key
        from an earlier connection is acknowledged on the current one: the
        broker redelivered that message with the same packet id (a persistent
        session), or it ignores the ack.
        """
        seen = set(self._unacked)
        for key in keys:
            if key not in seen:
                seen.add(key)
                self._unacked.append(key)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._inflight.pop(mid, None)
        try:
            self._notify("on_published", mid)
        except Exception:
            log.exception("%s: on_published handler failed", self.client_id)

    def batch_open(self) -> bool:
        """Handled messages wait for their ack: the read pass goes on while the socket has more.

        A batch that reaches MAX_ACK_BATCH messages or MAX_ACK_BATCH_BYTES is
        flushed and acknowledged at once, inside :meth:`_on_message`.
        """
        return bool(self._unacked)

    def send_acks(self) -> None:
        """Acknowledge the messages handled since the last call, once the handler's flush() made them durable.

        If flush() raises, none of them is acknowledged, now or later: the
        broker delivers them again in the next session (redelivery after a
        restart is what recovers them; the handler decides whether to stop).
        """
        if not self._unacked:
            return
        acks, self._unacked, self._unacked_bytes = self._unacked, [], 0
        flush = getattr(self.handler, "flush", None)
        if flush is not None:
            try:
                flush(self)
            except Exception:
                log.exception("%s: making %d handled messages durable failed: not acknowledging them",
                              self.client_id, len(acks))
                return
        if not self.connected:
            return  # the socket closed in this pass: the resumed session delivers them again
        for mid, qos in acks:
            self.client.ack(mid, qos)

    # -- selector registration ------------------------------------------------

    def _on_socket_open(self, client, userdata, sock) -> None:
        # MQTT messages are small and answered at once (PUBLISH -> PUBACK);
        # with Nagle's algorithm each waited for a delayed ACK, ~40 ms a hop
        # (bench/bench_rounds.py measured 79 ms of a 88 ms round).
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass  # not a TCP socket (e.g. a websocket wrapper): nothing to tune
        self.loop.selector.register(sock, selectors.EVENT_READ, self)

    def _on_socket_close(self, client, userdata, sock) -> None:
        try:
            self.loop.selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _on_register_write(self, client, userdata, sock) -> None:
        try:
            self.loop.selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, self)
        except (KeyError, ValueError):
            pass

    def _on_unregister_write(self, client, userdata, sock) -> None:
        try:
            self.loop.selector.modify(sock, selectors.EVENT_READ, self)
        except (KeyError, ValueError):
            pass
