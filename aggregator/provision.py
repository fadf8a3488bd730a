"""``fedmqtt provision``: the keys, certificates, passwords and ACL of a secured federation.

``fedmqtt provision init --dir DIR --fed FED --agents N [--workers W]`` writes
into DIR (deploy/mosquitto/README.md says where each file goes):

========================  ==========================================================
``ca.key`` ``ca.crt``     the federation's certificate authority (EC P-256). The key
                          signs every certificate; keep DIR offline.
``broker.key/.crt``       the broker's TLS certificate (SAN: ``--broker-host``)
``passwd``                mosquitto password file (PBKDF2-SHA512, ``$7$`` format)
``acl``                   mosquitto ACL, one ``user`` block per login: the aggregator
                          may use ``fl/<fed>/#``; an agent only its own update/status
                          topics, its inbox and the federation's model, model/onnx,
                          task, metrics, metrics/json and keys; an observer only reads;
                          ingest worker ``i`` reads the updates and its own
                          ``ingest/<i>/control`` and writes its ``ingest/<i>/claim``,
                          ``partial`` and ``status`` (docs/PROTOCOL.md §10.1)
``aggregator.*``          the aggregator's client certificate, key and MQTT password,
                          and ``aggregator.toml`` (the config keys that use them; with
                          ``--workers W``, a ``[workers]`` section too)
``ingest.password``       with ``--workers W``: the one MQTT password of the ingest
                          worker logins ``ingest-0`` … ``ingest-<W-1>`` (a worker
                          logs in as ``[workers] username``-I and presents the
                          aggregator's certificate; deploy/scale.md "Ingest workers")
``signing.key/.pub``      the aggregator's Ed25519 model-signing key (PKCS#8 PEM) and
                          its raw public key as 64 hex digits (what agents pin)
``agent-<id>.*``          per agent: client certificate (CN = agent id), key, MQTT
                          password (user name = agent id) and ``agent-<id>.toml``
                          (an id that starts with ``agent-`` is not prefixed again:
                          agent ``agent-000`` gets ``agent-000.*``)
``observer[-<name>].*``   per observer (``init`` makes one called ``observer``): a
                          read-only login for ``fedmqtt status`` and dashboards, with
                          certificate, key, password and ``observer.toml`` (its
                          ``[broker]`` keys and the ``fedmqtt status`` flags)
``provision.json``        what ``add-agent`` needs to issue more agents alike
========================  ==========================================================

``fedmqtt provision add-agent --dir DIR --agent NAME`` adds one more device:
it re-uses the CA, appends to ``passwd``, adds the agent's block to ``acl``
and writes only that agent's files; ``add-observer --dir DIR --observer NAME``
does the same for an observer. Private keys and passwords are written with
mode 0600. ``init`` refuses a directory that already has a CA unless
``--force``.

Why a block per user and no ``pattern`` lines: a mosquitto ``pattern`` line
applies to every user, the observers too (``pattern write fl/<fed>/update/%u``
would let the observer publish an update in its own name), and mosquitto
2.0 warns at every start about a pattern without ``%u``/``%c``; a ``topic``
line before the first ``user`` line applies to anonymous clients only. So
the topics every agent reads are repeated in each agent's block.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import ipaddress
import json
import secrets
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from edge_agent.files import atomic_write
from edge_agent.wire import valid_id

AGGREGATOR_USER = "aggregator"
# The ingest workers' user-name prefix ([workers] username): worker I logs in as ingest-I.
WORKER_USER = "ingest"
# The read-only login `init` creates unless told otherwise (--observer, --no-observer).
OBSERVER_USER = "observer"
DEFAULT_BROKER_HOSTS = ("localhost", "127.0.0.1")
DEFAULT_PORT = 8883
# The CA outlives every certificate it issues (issued ones are cut at its end).
CA_DAYS = 3650
CERT_DAYS = 1825
# mosquitto_passwd's format and iteration count (mosquitto 2.0): the passwords
# are 192 random bits, so the iteration count is not what protects them.
PBKDF2_ITERATIONS = 101
PASSWORD_BYTES = 24  # 32 URL-safe characters
MANIFEST = "provision.json"
# Clock skew between the provisioning machine and a device.
BACKDATE = dt.timedelta(minutes=5)


class ProvisionError(ValueError):
    """A provisioning request that cannot be carried out; the message says why and what to do."""


@dataclass(frozen=True)
class Files:
    """Where each provisioned file lives in the output directory."""

    dir: Path

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def broker_key(self) -> Path:
        return self.dir / "broker.key"

    @property
    def broker_cert(self) -> Path:
        return self.dir / "broker.crt"

    @property
    def passwd(self) -> Path:
        return self.dir / "passwd"

    @property
    def acl(self) -> Path:
        return self.dir / "acl"

    @property
    def signing_key(self) -> Path:
        return self.dir / "signing.key"

    @property
    def signing_pub(self) -> Path:
        return self.dir / "signing.pub"

    @property
    def manifest(self) -> Path:
        return self.dir / MANIFEST

    @property
    def ingest_password(self) -> Path:
        """The ingest workers' MQTT password (one for every ``ingest-<i>`` login)."""
        return self.dir / f"{WORKER_USER}.password"

    def client(self, name: str, suffix: str, kind: str | None = None) -> Path:
        """A client's file (crt, key, password, toml): ``aggregator.<suffix>``, ``agent-<id>.<suffix>``
        or ``observer-<name>.<suffix>``.

        ``kind`` is ``agent`` (the default for any name but ``aggregator``) or
        ``observer``. A name that already starts with ``<kind>-`` (or is
        ``<kind>``) is not prefixed again: agent ``agent-000`` has
        ``agent-000.crt``, observer ``observer`` has ``observer.crt``.
        """
        return self.dir / f"{stem(kind or _kind(name), name)}.{suffix}"

    def observer(self, name: str, suffix: str) -> Path:
        """An observer's file (crt, key, password, toml)."""
        return self.client(name, suffix, "observer")


def worker_user(index: int) -> str:
    """Ingest worker ``index``'s MQTT user name (``[workers] username = "ingest"`` makes it log in so)."""
    return f"{WORKER_USER}-{index}"


def worker_users(count: int) -> list[str]:
    """The user names of ``count`` ingest workers: ``ingest-0`` … ``ingest-<count-1>``."""
    return [worker_user(i) for i in range(count)]


def _worker_range(count: int) -> str:
    """``ingest-0``, or ``ingest-0 .. ingest-<count-1>``."""
    return worker_user(0) if count == 1 else f"{worker_user(0)} .. {worker_user(count - 1)}"


def _kind(name: str) -> str:
    return AGGREGATOR_USER if name == AGGREGATOR_USER else "agent"


def stem(kind: str, name: str) -> str:
    """The file-name stem of a client: ``<kind>-<name>``, or ``name`` when it already says its kind."""
    return name if name == kind or name.startswith(kind + "-") else f"{kind}-{name}"


def broker_files(directory: str | Path) -> dict[str, Path]:
    """The provisioned files by the mosquitto option that names them (deploy/mosquitto/mosquitto.conf)."""
    f = Files(Path(directory))
    return {"cafile": f.ca_cert, "certfile": f.broker_cert, "keyfile": f.broker_key,
            "password_file": f.passwd, "acl_file": f.acl}


# -- crypto -------------------------------------------------------------------


def _crypto():
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise ProvisionError("provisioning needs the cryptography package: pip install 'fedmqtt[aggregator]'") from None
    return x509, hashes, serialization, ec, ed25519, ExtendedKeyUsageOID, NameOID


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _key_pem(key) -> bytes:
    _, _, serialization, *_ = _crypto()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert) -> bytes:
    _, _, serialization, *_ = _crypto()
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str, federation: str):
    x509, *_, NameOID = _crypto()
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedmqtt"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, federation),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def make_ca(federation: str, days: int = CA_DAYS):
    """A new self-signed CA: (private key, certificate)."""
    x509, hashes, _, ec, *_ = _crypto()
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(f"fedmqtt CA {federation}", federation)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue(ca_key, ca_cert, common_name: str, federation: str, *, server_hosts: list[str] | None = None,
          days: int = CERT_DAYS):
    """A new key and a certificate for it signed by the CA: (private key, certificate).

    With ``server_hosts`` it is a TLS server certificate for those DNS names
    and IP addresses; without, a TLS client certificate (CN = ``common_name``).
    """
    x509, hashes, _, ec, _, EKU, _ = _crypto()
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    if not_after <= now:
        raise ProvisionError(f"the CA expired on {ca_cert.not_valid_after_utc:%Y-%m-%d}: provision a new one (init --force)")
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name, federation))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([EKU.SERVER_AUTH if server_hosts else EKU.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
    )
    if server_hosts:
        b = b.add_extension(x509.SubjectAlternativeName([_san(h) for h in server_hosts]), critical=False)
    return key, b.sign(ca_key, hashes.SHA256())


def _san(host: str):
    x509, *_ = _crypto()
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def signing_keypair() -> tuple[bytes, str]:
    """A new Ed25519 key: (PKCS#8 PEM of the private key, raw public key as 64 hex digits)."""
    _, _, serialization, _, ed25519, *_ = _crypto()
    key = ed25519.Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return _key_pem(key), raw.hex()


def password_hash(password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """The mosquitto 2.0 password-file hash (what ``mosquitto_passwd`` writes): ``$7$iter$salt$hash``."""
    salt = secrets.token_bytes(12) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


# What every agent may read, and what an observer may read (nothing else, and no writes).
AGENT_READS = ("model", "model/onnx", "task", "metrics", "metrics/json", "keys")
OBSERVER_READS = ("model", "model/onnx", "task", "metrics", "metrics/json", "keys", "agent/+/status")


def acl_text(federation: str, agents: list[str] | tuple[str, ...] = (),
             observers: list[str] | tuple[str, ...] = (), workers: int = 0) -> str:
    """The mosquitto ACL of one federation: one ``user`` block per login, no ``pattern`` lines.

    mosquitto applies a ``topic`` line to the user named by the ``user`` line
    above it, a ``topic`` line before any ``user`` line to anonymous clients
    only, and a ``pattern`` line to every user (observers too), warning at
    each start about a pattern without ``%u``/``%c``. So the topics every
    agent reads are repeated in each agent's block, and adding a login
    rewrites this file.

    ``workers``: one block per ingest worker ``ingest-<i>`` (docs/PROTOCOL.md
    §10.1). mosquitto checks the worker's ``$share/<group>/fl/<fed>/update/+``
    against the plain topic, so ``read fl/<fed>/update/+`` lets it receive its
    share; nothing under ``fl/<fed>/ingest/`` is open to any device or observer.
    """
    p = f"fl/{federation}"
    out = [
        f"# fedmqtt ACL for federation {federation!r}, written by `fedmqtt provision`",
        "# (add-agent and add-observer rewrite it: install it again and reload the broker).",
        "# Anything not allowed here is denied. Every topic line applies to the user",
        "# line above it: an agent may publish only its own update and status and read",
        "# its own inbox and selected notice, and the federation's model, model/onnx, task,",
        "# metrics(/json), keys (so no agent learns who else is selected);",
        "# an observer may only read; the aggregator may use everything under",
        f"# {p}/. There are no pattern lines: they would apply to the observers too.",
    ]
    if workers:
        out += ["# An ingest worker reads the updates (its share of them) and talks to the",
                f"# coordinator only on its own {p}/ingest/<i>/ topics; no device may use those."]
    out += [
        "",
        "# The aggregator",
        f"user {AGGREGATOR_USER}",
        f"topic readwrite {p}/#",
    ]
    for i in range(workers):
        q = f"{p}/ingest/{i}"
        out += ["", f"# Ingest worker {i} ([workers] username = {_toml_str(WORKER_USER)}; docs/PROTOCOL.md §10.1)",
                f"user {worker_user(i)}",
                f"topic read {p}/update/+",
                f"topic write {q}/claim",
                f"topic write {q}/partial",
                f"topic write {q}/status",
                f"topic read {q}/control"]
    for o in observers:
        out += ["", f"# Observer {o}: read only (fedmqtt status, dashboards)", f"user {o}"]
        out += [f"topic read {p}/{t}" for t in OBSERVER_READS]
    for a in agents:
        out += ["", f"# Agent {a}", f"user {a}",
                f"topic write {p}/update/{a}",
                f"topic write {p}/agent/{a}/status",
                f"topic read {p}/agent/{a}/inbox",
                f"topic read {p}/agent/{a}/selected",
                # chunked payloads (docs/PROTOCOL.md §8): its own update's chunks, the model's retained chunks
                f"topic write {p}/update/{a}/chunk",
                f"topic read {p}/model/chunk/+"]
        out += [f"topic read {p}/{t}" for t in AGENT_READS]
    return "\n".join(out) + "\n"


def _write_acl(f: Files, m: dict) -> None:
    _write(f.acl, acl_text(m["federation"], m["agents"], m.get("observers", []), m.get("workers", 0)), 0o644)


# -- files --------------------------------------------------------------------


def _write(path: Path, data: bytes | str, mode: int) -> None:
    """Write atomically with ``mode`` (never briefly readable by others)."""
    atomic_write(path, data, mode)


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string of printable text is a TOML basic string


def _broker_section(m: dict, user: str, files: dict[str, str]) -> str:
    return (
        "[broker]\n"
        f"host = {_toml_str(m['broker_hosts'][0])}\n"
        f"port = {m['port']}\n"
        f"username = {_toml_str(user)}\n"
        f"password_file = {_toml_str(files['password'])}\n"
        "tls = true\n"
        f"ca_file = {_toml_str(files['ca'])}\n"
        f"cert_file = {_toml_str(files['crt'])}\n"
        f"key_file = {_toml_str(files['key'])}\n"
    )


def _installed(m: dict, key: str, f: Files, name: str, kind: str | None = None) -> dict[str, str]:
    """Paths of a client's files where they will live (``--agent-dir`` / ``--aggregator-dir`` / ``--observer-dir``)."""
    base = Path(m.get(key) or f.dir)
    return {"ca": str(base / f.ca_cert.name),
            **{s: str(base / f.client(name, s, kind).name) for s in ("crt", "key", "password")}}


def _agent_toml(m: dict, f: Files, agent: str) -> str:
    files = _installed(m, "agent_dir", f, agent)
    crt, key, pw = (f.client(agent, s).name for s in ("crt", "key", "password"))
    return (
        f"# fedmqtt agent {agent!r} of federation {m['federation']!r}, written by `fedmqtt provision`.\n"
        f"# Copy ca.crt, {crt}, {key} and {pw} to\n"
        f"# {m['agent_dir']} on the device (key and password: mode 0600, owned by the user that\n"
        "# runs `fedmqtt agent`), then merge these keys into its agent.toml.\n"
        "\n"
        f"federation = {_toml_str(m['federation'])}\n"
        f"agent_id = {_toml_str(agent)}   # must equal the MQTT user name: the broker's ACL allows update/<user name> only\n"
        "\n"
        "[security]\n"
        f"trusted_keys = [{_toml_str(m['signing_pub'])}]   # the aggregator's model-signing key (signing.pub)\n"
        "\n"
        + _broker_section(m, agent, files)
    )


def _aggregator_toml(m: dict, f: Files) -> str:
    files = _installed(m, "aggregator_dir", f, AGGREGATOR_USER)
    workers = m.get("workers", 0)
    out = (
        f"# fedmqtt aggregator of federation {m['federation']!r}, written by `fedmqtt provision`.\n"
        "# Copy ca.crt, aggregator.crt, aggregator.key, aggregator.password"
        + (", signing.key and ingest.password" if workers else " and signing.key") + " to\n"
        f"# {m['aggregator_dir']} on the aggregator host (keys and passwords: mode 0600, owned by the\n"
        "# user that runs `fedmqtt aggregator`), then merge these keys into its aggregator.toml.\n"
    )
    if workers:
        out += ("# A worker on another machine needs ca.crt, aggregator.crt, aggregator.key and\n"
                "# ingest.password there (it presents the aggregator's certificate and logs in as ingest-I).\n")
    out += (
        "\n"
        f"federation = {_toml_str(m['federation'])}\n"
        "\n"
        "[security]\n"
        f"signing_key = {_toml_str(str(Path(m['aggregator_dir']) / f.signing_key.name))}\n"
        "\n"
        + _broker_section(m, AGGREGATOR_USER, files)
    )
    if workers:
        pw = Path(m.get("aggregator_dir") or f.dir) / f.ingest_password.name
        out += (
            "\n"
            "[workers]\n"
            f"count = {workers}   # logins and ACL blocks exist for {_worker_range(workers)} only\n"
            f"username = {_toml_str(WORKER_USER)}   # worker I logs in as {WORKER_USER}-I\n"
            f"password_file = {_toml_str(str(pw))}\n"
        )
    return out


def status_flags(m: dict, f: Files, observer: str) -> list[str]:
    """``fedmqtt status`` with an observer's login: the argv after ``fedmqtt``."""
    files = _installed(m, "observer_dir", f, observer, "observer")
    return ["status", "--fed", m["federation"], "--broker-host", m["broker_hosts"][0], "--broker-port", str(m["port"]),
            "--broker-tls", "true", "--broker-ca-file", files["ca"], "--broker-cert-file", files["crt"],
            "--broker-key-file", files["key"], "--broker-username", observer, "--broker-password-file", files["password"]]


def _observer_toml(m: dict, f: Files, observer: str) -> str:
    files = _installed(m, "observer_dir", f, observer, "observer")
    crt, key, pw = (f.observer(observer, s).name for s in ("crt", "key", "password"))
    argv = [shlex.quote(a) for a in ["fedmqtt", *status_flags(m, f, observer)]]
    # two flags per line after the federation
    lines = [" ".join(argv[:4])] + [" ".join(argv[i:i + 4]) for i in range(4, len(argv), 4)]
    command = " \\\n#       ".join(lines)
    return (
        f"# fedmqtt observer {observer!r} of federation {m['federation']!r}, written by `fedmqtt provision`.\n"
        "# A read-only login: the broker's ACL lets it read the retained model, model/onnx, task,\n"
        "# metrics, metrics/json, keys and every agent's status, and publish nothing. Use it to watch the\n"
        "# federation (`fedmqtt status`, a dashboard) instead of the aggregator's or a device's\n"
        "# login: the broker replaces each client id by the user name, so a second login as the\n"
        "# aggregator takes over the running aggregator's connection. Two programs watching at\n"
        "# once take over each other too: give each its own (`fedmqtt provision add-observer`).\n"
        f"# Copy ca.crt, {crt}, {key} and {pw} to {m.get('observer_dir') or f.dir}\n"
        "# (key and password: mode 0600, owned by the user that watches), then:\n"
        "#\n"
        f"#   {command}\n"
        "#\n"
        "# or load the [broker] keys below into a program's config.\n"
        "\n"
        f"federation = {_toml_str(m['federation'])}\n"
        "\n"
        + _broker_section(m, observer, files)
    )


def _passwd_lines(path: Path) -> list[str]:
    try:
        return [ln for ln in path.read_text().splitlines() if ln.strip()]
    except FileNotFoundError:
        return []


def _set_password(path: Path, user: str, password: str) -> None:
    """Add ``user`` to the password file, or replace its line."""
    lines = [ln for ln in _passwd_lines(path) if ln.split(":", 1)[0] != user]
    lines.append(f"{user}:{password_hash(password)}")
    _write(path, "\n".join(lines) + "\n", 0o600)


def _issue_client(f: Files, m: dict, ca_key, ca_cert, name: str, kind: str | None = None) -> None:
    """Certificate, key, password (and the password-file line) of the aggregator, an agent or an observer."""
    kind = kind or _kind(name)
    key, cert = issue(ca_key, ca_cert, name, m["federation"], days=m["days"])
    password = secrets.token_urlsafe(PASSWORD_BYTES)
    _write(f.client(name, "key", kind), _key_pem(key), 0o600)
    _write(f.client(name, "crt", kind), _cert_pem(cert), 0o644)
    _write(f.client(name, "password", kind), password + "\n", 0o600)
    _set_password(f.passwd, name, password)
    toml = {AGGREGATOR_USER: lambda: _aggregator_toml(m, f), "agent": lambda: _agent_toml(m, f, name),
            "observer": lambda: _observer_toml(m, f, name)}[kind]()
    _write(f.client(name, "toml", kind), toml, 0o644)


def _issue_workers(f: Files, m: dict) -> None:
    """The ingest workers' logins: one password (``ingest.password``) for the users ingest-0 .. ingest-<N-1>."""
    n = m.get("workers", 0)
    if not n:
        return
    password = secrets.token_urlsafe(PASSWORD_BYTES)
    _write(f.ingest_password, password + "\n", 0o600)
    for user in worker_users(n):
        _set_password(f.passwd, user, password)


def _check_names(kind: str, names: list[str], existing: dict[str, list[str]] | None = None) -> None:
    """New ``kind`` logins (agent ids or observer names) next to the ``existing`` ones by kind.

    One MQTT user per name across every kind, and one file stem per name
    within a kind (agents ``000`` and ``agent-000`` would share
    ``agent-000.crt``). A name already of this kind is allowed (re-issued
    with ``--force``, which the caller checks).
    """
    what = "agent id" if kind == "agent" else "observer name"
    existing = existing or {}
    for a in names:
        if not valid_id(a):
            raise ProvisionError(f"{what} {a!r} must match [A-Za-z0-9_-]{{1,64}}")
        if a == AGGREGATOR_USER:
            raise ProvisionError(f"{AGGREGATOR_USER!r} is the aggregator's user name, not an {what}")
        for other, users in existing.items():
            if other != kind and a in users:
                raise ProvisionError(f"{a!r} is already the user name of an {other}; pick another {what}")
    dup = sorted({a for a in names if names.count(a) > 1})
    if dup:
        raise ProvisionError(f"{what}s given twice: {', '.join(dup)}")
    stems: dict[str, str] = {stem(kind, a): a for a in existing.get(kind, [])}
    for a in names:
        s = stem(kind, a)
        if stems.setdefault(s, a) != a:
            raise ProvisionError(f"{what}s {stems[s]!r} and {a!r} would share the files {s}.*; pick another {what}")


def _check_agents(agents: list[str], workers: int = 0) -> None:
    _check_names("agent", agents, {"ingest worker": worker_users(workers)})


def _load_ca(f: Files):
    x509, _, serialization, *_ = _crypto()
    try:
        ca_key = serialization.load_pem_private_key(f.ca_key.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(f.ca_cert.read_bytes())
        m = json.loads(f.manifest.read_text())
    except FileNotFoundError as exc:
        raise ProvisionError(f"{f.dir}: no provisioned federation here ({exc.filename} missing); run `fedmqtt provision init` first") from None
    except ValueError as exc:
        raise ProvisionError(f"{f.dir}: cannot read the CA or {MANIFEST}: {exc}") from None
    return ca_key, ca_cert, m


def init(directory: str | Path, federation: str, agents: list[str], broker_hosts: list[str] | None = None,
         port: int = DEFAULT_PORT, days: int = CERT_DAYS, ca_days: int = CA_DAYS, agent_dir: str | None = None,
         aggregator_dir: str | None = None, force: bool = False, observers: list[str] | None = None,
         observer_dir: str | None = None, workers: int = 0) -> Files:
    """Provision a new federation into ``directory`` (see the module docstring).

    ``observers``: the read-only logins to create (default: one, ``observer``; ``[]``: none).
    ``workers``: the ingest worker logins to create (``ingest-0`` …, one password, ``ingest.password``).
    """
    if not valid_id(federation):
        raise ProvisionError(f"federation id {federation!r} must match [A-Za-z0-9_-]{{1,64}}")
    from .ingest.wire import MAX_WORKERS

    if not 0 <= workers <= MAX_WORKERS:
        raise ProvisionError(f"--workers must be in 0..{MAX_WORKERS} ([workers] count), got {workers}")
    observers = [OBSERVER_USER] if observers is None else list(observers)
    _check_agents(agents, workers)
    _check_names("observer", observers, {"agent": agents, "ingest worker": worker_users(workers)})
    hosts = list(broker_hosts or DEFAULT_BROKER_HOSTS)
    for h in hosts:
        if not h or (not _is_ip(h) and any(c.isspace() or c in "/:@[]" for c in h)):
            raise ProvisionError(f"--broker-host {h!r}: expected a DNS name or an IP address")
    if not 1 <= port <= 65535:
        raise ProvisionError(f"--port must be in 1..65535, got {port}")
    if days < 1 or ca_days < days:
        raise ProvisionError(f"need 1 <= --days <= --ca-days, got {days} and {ca_days}")
    d = Path(directory).absolute()
    f = Files(d)
    if f.ca_key.exists() and not force:
        raise ProvisionError(
            f"{d} already holds a CA ({f.ca_key.name}); add devices with `fedmqtt provision add-agent --dir {directory}"
            " --agent NAME`, or pass --force to start over (every device must then be provisioned again)")
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    if force:
        _remove_previous(f)
    m = {
        "federation": federation,
        "broker_hosts": hosts,
        "port": port,
        "days": days,
        "agent_dir": agent_dir or str(d),
        "aggregator_dir": aggregator_dir or str(d),
        "observer_dir": observer_dir or str(d),
        "agents": [],
        "observers": [],
        "workers": workers,
    }
    ca_key, ca_cert = make_ca(federation, ca_days)
    _write(f.ca_key, _key_pem(ca_key), 0o600)
    _write(f.ca_cert, _cert_pem(ca_cert), 0o644)
    broker_key, broker_cert = issue(ca_key, ca_cert, hosts[0], federation, server_hosts=hosts, days=days)
    _write(f.broker_key, _key_pem(broker_key), 0o600)
    _write(f.broker_cert, _cert_pem(broker_cert), 0o644)
    signing_pem, signing_pub = signing_keypair()
    _write(f.signing_key, signing_pem, 0o600)
    _write(f.signing_pub, signing_pub + "\n", 0o644)
    m["signing_pub"] = signing_pub
    _write(f.passwd, "", 0o600)
    _issue_client(f, m, ca_key, ca_cert, AGGREGATOR_USER)
    _issue_workers(f, m)
    for a in agents:
        _issue_client(f, m, ca_key, ca_cert, a)
    for o in observers:
        _issue_client(f, m, ca_key, ca_cert, o, "observer")
    m["agents"] = list(agents)
    m["observers"] = observers
    _write_acl(f, m)
    _write(f.manifest, json.dumps(m, indent=2) + "\n", 0o644)
    return f


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _remove_previous(f: Files) -> None:
    """--force: drop the previous federation's agent files, whose CA is about to be replaced."""
    try:
        m = json.loads(f.manifest.read_text())
    except (OSError, ValueError):
        m = {}
    f.ingest_password.unlink(missing_ok=True)  # the previous workers' logins are gone with its passwd
    for kind in ("agent", "observer"):
        for a in m.get(kind + "s", []):
            if isinstance(a, str) and valid_id(a) and a != AGGREGATOR_USER:
                for s in ("crt", "key", "password", "toml"):
                    f.client(a, s, kind).unlink(missing_ok=True)
                    if kind == "agent":  # the doubled names earlier versions wrote (agent-agent-000.crt)
                        (f.dir / f"agent-{a}.{s}").unlink(missing_ok=True)


def add_agents(directory: str | Path, agents: list[str], force: bool = False) -> Files:
    """Add agents to a provisioned federation: only their files, password-file lines and ACL blocks are written."""
    return _add("agent", directory, agents, force)


def add_observers(directory: str | Path, observers: list[str], force: bool = False) -> Files:
    """Add read-only observer logins to a provisioned federation (like :func:`add_agents`)."""
    return _add("observer", directory, observers, force)


def _add(kind: str, directory: str | Path, names: list[str], force: bool) -> Files:
    _check_names(kind, names)
    f = Files(Path(directory).absolute())
    ca_key, ca_cert, m = _load_ca(f)
    m.setdefault("observers", [])  # a directory provisioned before observers existed
    _check_names(kind, names, {"agent": m["agents"], "observer": m["observers"],
                               "ingest worker": worker_users(m.get("workers", 0))})
    users = {ln.split(":", 1)[0] for ln in _passwd_lines(f.passwd)}
    exists = [a for a in names if a in users or f.client(a, "crt", kind).exists()]
    if exists and not force:
        raise ProvisionError(
            f"already provisioned: {', '.join(exists)} (--force issues a new password and certificate;"
            " the old ones stop working once the broker reloads the password file)")
    for a in names:
        _issue_client(f, m, ca_key, ca_cert, a, kind)
        if a not in m[kind + "s"]:
            m[kind + "s"].append(a)
        _write_acl(f, m)
        _write(f.manifest, json.dumps(m, indent=2) + "\n", 0o644)
    return f


# -- command line -------------------------------------------------------------

EXAMPLE = """examples:
  fedmqtt provision init --dir fedmqtt-pki --fed plant-7 --agents 3 --broker-host mqtt.example.com
  fedmqtt provision init --dir fedmqtt-pki --fed plant-7 --agent pi-kitchen --agent pi-garage
  fedmqtt provision init --dir fedmqtt-pki --fed plant-7 --agents 3 --workers 4
  fedmqtt provision add-agent --dir fedmqtt-pki --agent pi-attic
  fedmqtt provision add-observer --dir fedmqtt-pki --observer dashboard

Then install the broker's files (deploy/mosquitto/README.md) and hand each device
ca.crt and its agent-<id>.* files. `init` also makes a read-only login, observer.*,
for `fedmqtt status` (observer.toml holds the command line). With --workers N it
makes the ingest worker logins ingest-0 .. ingest-<N-1> (password: ingest.password)
and a [workers] section in aggregator.toml (deploy/scale.md, "Ingest workers").
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedmqtt provision",
        description="Create the CA, certificates, MQTT passwords, ACL and signing key of a secured federation.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="action", required=True, metavar="{init,add-agent,add-observer}")
    i = sub.add_parser("init", help="provision a new federation (CA, broker, aggregator, agents)",
                       epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    i.add_argument("--dir", required=True, help="output directory (created, mode 0700)")
    i.add_argument("--federation", "--fed", dest="federation", required=True, help="federation id")
    i.add_argument("--agents", type=int, default=0, metavar="N",
                   help="provision N agents named agent-000, agent-001, ... (as `fedmqtt sim` names them)")
    i.add_argument("--agent", action="append", default=[], metavar="NAME", help="provision an agent with this id (repeatable)")
    i.add_argument("--broker-host", action="append", default=[], metavar="HOST",
                   help="DNS name or IP address clients use to reach the broker (repeatable; "
                        "default: localhost and 127.0.0.1); the first goes into the .toml files")
    i.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"broker TLS port written into the .toml files (default {DEFAULT_PORT})")
    i.add_argument("--days", type=int, default=CERT_DAYS, help=f"validity of the broker and client certificates (default {CERT_DAYS})")
    i.add_argument("--ca-days", type=int, default=CA_DAYS, help=f"validity of the CA (default {CA_DAYS})")
    i.add_argument("--agent-dir", metavar="PATH",
                   help="where the agents' files will live on the devices: the paths in agent-<id>.toml (default: --dir)")
    i.add_argument("--aggregator-dir", metavar="PATH",
                   help="where the aggregator's files will live: the paths in aggregator.toml (default: --dir)")
    i.add_argument("--observer", action="append", default=[], metavar="NAME",
                   help=f"read-only login (fedmqtt status, dashboards) with this user name (repeatable; "
                        f"default: one called {OBSERVER_USER!r})")
    i.add_argument("--no-observer", action="store_true", help="make no observer login")
    i.add_argument("--observer-dir", metavar="PATH",
                   help="where the observers' files will live: the paths in observer*.toml (default: --dir)")
    i.add_argument("--workers", type=int, default=0, metavar="N",
                   help=f"make N ingest worker logins, {WORKER_USER}-0 .. {WORKER_USER}-<N-1>, with one password "
                        f"({WORKER_USER}.password), their ACL blocks and a [workers] section in aggregator.toml "
                        "(default 0: none; deploy/scale.md \"Ingest workers\")")
    i.add_argument("--force", action="store_true", help="replace an existing CA and everything issued from it")
    a = sub.add_parser("add-agent", help="add agents to a provisioned federation (re-uses its CA)")
    a.add_argument("--dir", required=True, help="the directory `provision init` wrote")
    a.add_argument("--agent", action="append", required=True, metavar="NAME", help="agent id (repeatable)")
    a.add_argument("--force", action="store_true", help="re-issue an agent that exists (new password and certificate)")
    o = sub.add_parser("add-observer", help="add read-only logins (fedmqtt status, dashboards) to a provisioned federation")
    o.add_argument("--dir", required=True, help="the directory `provision init` wrote")
    o.add_argument("--observer", action="append", required=True, metavar="NAME", help="observer user name (repeatable)")
    o.add_argument("--force", action="store_true", help="re-issue an observer that exists (new password and certificate)")
    return p


def provision_main(argv: list[str]) -> int:
    """``fedmqtt provision``; user errors become one line and exit code 2."""
    args = _parser().parse_args(argv)
    try:
        if args.action == "init":
            if args.agents < 0:
                raise ProvisionError(f"--agents must be >= 0, got {args.agents}")
            from .sim import agent_ids

            agents = agent_ids(args.agents) + args.agent
            if args.no_observer and args.observer:
                raise ProvisionError("--no-observer and --observer contradict each other")
            observers = [] if args.no_observer else (args.observer or None)
            f = init(args.dir, args.federation, agents, args.broker_host or None, args.port, args.days,
                     args.ca_days, args.agent_dir, args.aggregator_dir, args.force, observers, args.observer_dir,
                     args.workers)
            m = json.loads(f.manifest.read_text())
            print(f"provisioned federation {m['federation']!r} in {f.dir}: CA, broker "
                  f"({', '.join(m['broker_hosts'])}), aggregator, {len(agents)} agent(s), "
                  f"{len(m['observers'])} observer(s)" + (f" ({', '.join(m['observers'])})" if m["observers"] else "")
                  + (f", {m['workers']} ingest worker login(s) ({_worker_range(m['workers'])})"
                     if m["workers"] else ""))
        else:
            names = args.agent if args.action == "add-agent" else args.observer
            add = add_agents if args.action == "add-agent" else add_observers
            f = add(args.dir, names, args.force)
            print(f"added {', '.join(names)} to {f.dir}; reload the broker's password file and ACL "
                  "(install passwd and acl, then `systemctl reload mosquitto`)")
        print(f"model-signing public key (agents pin it): {f.signing_pub.read_text().strip()}")
        return 0
    except (ProvisionError, OSError) as exc:
        sys.stderr.write(f"fedmqtt provision: error: {exc}\n")
        return 2
