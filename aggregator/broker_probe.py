"""Does the broker let anonymous clients publish agent updates? (docs/PROTOCOL.md §1.5)

An update's sender is the ``<agent>`` of its topic ``fl/<fed>/update/<agent>``:
nothing else in the message proves who sent it. That is sound only on a
broker that authenticates every client and lets each publish to its own
topics only (deploy/mosquitto/, the ACL of ``fedmqtt provision``). On an
open broker anyone who can reach it can send an update in any agent's name,
and a forgery that arrives first is accepted while the genuine update is
dropped as a duplicate.

So at start the aggregator tries it: a second MQTT v5 connection to the
same broker with the same TLS settings (TLS on or off, the same CA), but no
user name, no client certificate and a random client id, publishes one
empty QoS 1 message to ``fl/<fed>/update/.probe-<random>`` and reads the
broker's answer: a refused CONNACK or a PUBACK "not authorized" means
closed, a successful PUBACK means open, and a broker that drops a TLS
client without a certificate (``require_certificate``) while the
aggregator has one is closed to anonymous clients too.

Why no client certificate: with mosquitto's ``use_identity_as_username
true`` the certificate alone logs a client in as its CN, so a probe with the
aggregator's certificate would log in *as the aggregator*, be allowed to
publish (a false alarm), and, with ``use_username_as_clientid``, take over
the running aggregator's connection. The price: a broker that admits every
holder of a certificate of its CA without a password and without an ACL
is not detected. The topic matches the aggregator's own subscription
``update/+`` (so the same ACL rules decide), but ``.probe-...`` is not a
valid agent id: every fedmqtt receiver ignores it without counting a
rejection (PROTOCOL.md §1.2), and the payload is empty besides.

With ``[broker] protocol = "3.1.1"`` the probe speaks 3.1.1 too. A 3.1.1
PUBACK has no reason code (mosquitto acknowledges a publish its ACL denies,
then drops it), so there an anonymous client that gets in and is not
disconnected for publishing counts as open: the warning says so.

It runs on its own thread, so start-up is never delayed, and gives up after
:data:`PROBE_TIMEOUT_S`. ``[security] probe_open_broker = false`` skips it.
"""

from __future__ import annotations

import logging
import secrets
import ssl
import threading
import time
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.config import BrokerConfig
from edge_agent.topics import Topics

log = logging.getLogger(__name__)

# The whole probe (TCP, TLS, CONNACK, PUBACK) against a healthy broker takes
# milliseconds; past this the answer is "could not tell", never a delay.
PROBE_TIMEOUT_S = 5.0


def probe_topic(fed: str) -> str:
    """A fresh probe topic under ``fl/<fed>/update/`` that no fedmqtt receiver acts on."""
    return f"{Topics(fed).prefix}/update/.probe-{secrets.token_hex(6)}"


@dataclass
class ProbeResult:
    """``open``: True when the broker accepted the anonymous publish, False when it refused it,
    None when the probe could not tell (unreachable, TLS failure, timeout); ``detail`` says what happened."""

    open: bool | None
    detail: str


def probe_anonymous_publish(broker: BrokerConfig, fed: str, timeout: float = PROBE_TIMEOUT_S) -> ProbeResult:
    """Try an anonymous QoS 1 publish under ``fl/<fed>/update/`` (blocking, at most ~``timeout`` s)."""
    topic = probe_topic(fed)
    mqtt5 = broker.mqtt5  # [broker] protocol: the probe speaks what the aggregator speaks
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"fedmqtt-probe-{secrets.token_hex(6)}",
                    protocol=paho.MQTTv5 if mqtt5 else paho.MQTTv311, reconnect_on_failure=False)
    c.connect_timeout = timeout
    if broker.tls:
        # Never our client certificate: it could log the probe in as us (module docstring).
        c.tls_set(ca_certs=broker.ca_file or None)
    # We connect with a certificate, so the broker may demand one: a TLS connection it
    # drops before CONNACK then means "no certificate, no entry".
    cert_wall = bool(broker.tls and broker.cert_file)
    no_cert = ("the broker dropped a TLS client without a certificate before any CONNACK "
               "(require_certificate): anonymous clients cannot connect")
    seen: dict = {}
    c.on_connect = lambda _c, _u, _f, rc, _p: seen.setdefault("connack", rc)
    c.on_publish = lambda _c, _u, _mid, rc, _p: seen.setdefault("puback", rc)
    c.on_disconnect = lambda _c, _u, _f, rc, _p: seen.setdefault("disconnect", rc)
    deadline = time.monotonic() + timeout

    def wait_for(key: str) -> bool:
        while key not in seen and "disconnect" not in seen and time.monotonic() < deadline:
            c.loop(timeout=0.05)
        return key in seen

    try:
        keepalive = max(5, min(60, int(timeout) + 5))
        if mqtt5:
            c.connect(broker.host, broker.port, keepalive=keepalive, clean_start=True)
        else:
            c.connect(broker.host, broker.port, keepalive=keepalive)  # clean session: the Client's default
        if not wait_for("connack"):
            if "disconnect" in seen and cert_wall:
                return ProbeResult(False, no_cert)
            why = f"disconnected ({seen['disconnect']})" if "disconnect" in seen else f"no CONNACK within {timeout:g}s"
            return ProbeResult(None, f"anonymous probe connection: {why}")
        if seen["connack"].is_failure:
            return ProbeResult(False, f"anonymous connection refused: {seen['connack']}")
        c.publish(topic, b"", qos=1, retain=False)
        if not wait_for("puback"):
            # mosquitto and others may drop the connection of a client that
            # publishes where it must not (an MQTT v5 broker answers with PUBACK).
            if "disconnect" in seen:
                return ProbeResult(False, f"disconnected after an anonymous publish to {topic} ({seen['disconnect']})")
            return ProbeResult(None, f"no PUBACK for an anonymous publish to {topic} within {timeout:g}s")
        rc = seen["puback"]
        if not mqtt5:
            # A 3.1.1 PUBACK has no reason code: brokers acknowledge a publish their ACL denies
            # (mosquitto does) and drop it. What we know: an anonymous client got in and was not
            # disconnected for publishing; an ACL may still drop it, so say "may".
            return ProbeResult(True, f"MQTT 3.1.1: the broker admitted an anonymous client and acknowledged its "
                                     f"publish to {topic} (a 3.1.1 PUBACK cannot say whether an ACL dropped it; "
                                     "check that the broker refuses anonymous logins)")
        if rc.is_failure:
            return ProbeResult(False, f"anonymous publish to {topic} refused: {rc}")
        return ProbeResult(True, f"anonymous publish to {topic} accepted ({rc})")
    except ssl.SSLError as exc:
        if cert_wall and not isinstance(exc, ssl.SSLCertVerificationError):
            return ProbeResult(False, f"{no_cert} ({exc.reason or exc})")
        return ProbeResult(None, f"anonymous probe connection failed: {type(exc).__name__}: {exc}")
    except (OSError, ValueError) as exc:
        return ProbeResult(None, f"anonymous probe connection failed: {type(exc).__name__}: {exc}")
    finally:
        try:
            if "connack" in seen and "disconnect" not in seen:
                c.disconnect()
                c.loop(timeout=0.05)
        except Exception:  # closing a half-open socket: nothing left to learn
            pass
        sock = c.socket()
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass


class BrokerProbe:
    """:func:`probe_anonymous_publish` on a daemon thread, logging a WARNING when the broker is open."""

    def __init__(self, broker: BrokerConfig, fed: str, timeout: float = PROBE_TIMEOUT_S) -> None:
        self.broker = broker
        self.fed = fed
        self.timeout = timeout
        self.result: ProbeResult | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="fedmqtt-broker-probe", daemon=True)

    def start(self) -> "BrokerProbe":
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            r = self.result = probe_anonymous_publish(self.broker, self.fed, self.timeout)
            where = f"{self.broker.host}:{self.broker.port}"
            if r.open:
                log.warning(
                    "the broker at %s lets anonymous clients publish to fl/%s/update/+: anyone who can reach it "
                    "can send updates in any agent's name (a forgery sent first is accepted, the genuine update "
                    "dropped as a duplicate). A production broker MUST authenticate clients and enforce the ACL "
                    "of `fedmqtt provision` (deploy/mosquitto/, docs/PROTOCOL.md §1.5); set [security] "
                    "probe_open_broker = false to skip this check on a development broker. (%s)",
                    where, self.fed, r.detail)
            elif r.open is None:
                log.info("could not tell whether the broker at %s admits anonymous updates: %s", where, r.detail)
            else:
                log.debug("the broker at %s refuses anonymous updates: %s", where, r.detail)
        except Exception:
            log.exception("broker probe failed")
        finally:
            self.done.set()
