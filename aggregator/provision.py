"""``fedmqtt provision``: the keys, certificates, passwords and ACL of a secured federation.

``fedmqtt provision init --dir DIR --fed FED --agents N`` writes into DIR
(deploy/mosquitto/README.md says where each file goes):

========================  ==========================================================
``ca.key`` ``ca.crt``     the federation's certificate authority (EC P-256). The key
                          signs every certificate; keep DIR offline.
``broker.key/.crt``       the broker's TLS certificate (SAN: ``--broker-host``)
``passwd``                mosquitto password file (PBKDF2-SHA512, ``$7$`` format)
``acl``                   mosquitto ACL: the aggregator may use ``fl/<fed>/#``, an
                          agent only its own update/status topics and the
                          federation's model, model/onnx, task, metrics and keys
``aggregator.*``          the aggregator's client certificate, key and MQTT password,
                          and ``aggregator.toml`` (the config keys that use them)
``signing.key/.pub``      the aggregator's Ed25519 model-signing key (PKCS#8 PEM) and
                          its raw public key as 64 hex digits (what agents pin)
``agent-<id>.*``          per agent: client certificate (CN = agent id), key, MQTT
                          password (user name = agent id) and ``agent-<id>.toml``
``provision.json``        what ``add-agent`` needs to issue more agents alike
========================  ==========================================================

``fedmqtt provision add-agent --dir DIR --agent NAME`` adds one more device:
it re-uses the CA, appends to ``passwd`` and writes only that agent's files
(the ACL uses patterns, so it never changes). Private keys and passwords
are written with mode 0600. ``init`` refuses a directory that already has a
CA unless ``--force``.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import ipaddress
import json
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from edge_agent.files import atomic_write
from edge_agent.wire import valid_id

AGGREGATOR_USER = "aggregator"
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

    def client(self, name: str, suffix: str) -> Path:
        """``aggregator.<suffix>`` or ``agent-<id>.<suffix>`` (crt, key, password, toml)."""
        stem = name if name == AGGREGATOR_USER else f"agent-{name}"
        return self.dir / f"{stem}.{suffix}"


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


def acl_text(federation: str) -> str:
    """The mosquitto ACL of one federation (pattern lines apply to every user, ``%u`` = its name)."""
    p = f"fl/{federation}"
    return (
        f"# fedmqtt ACL for federation {federation!r}, written by `fedmqtt provision`.\n"
        "# Anything not allowed here is denied: an agent can publish only its own\n"
        "# update and status, and never model, model/onnx, task or metrics.\n"
        "# The patterns need no change when an agent is added (%u = the MQTT user name,\n"
        "# which the password file makes equal to the agent id).\n"
        "\n"
        "# Every agent\n"
        f"pattern write {p}/update/%u\n"
        f"pattern write {p}/agent/%u/status\n"
        f"pattern read {p}/agent/%u/inbox\n"
        f"pattern read {p}/model\n"
        f"pattern read {p}/model/onnx\n"
        f"pattern read {p}/task\n"
        f"pattern read {p}/metrics\n"
        f"pattern read {p}/keys\n"
        "\n"
        "# The aggregator\n"
        f"user {AGGREGATOR_USER}\n"
        f"topic readwrite {p}/#\n"
    )


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


def _installed(m: dict, key: str, f: Files, name: str) -> dict[str, str]:
    """Paths of a client's files where they will live (``--agent-dir`` / ``--aggregator-dir``)."""
    base = Path(m[key])
    return {"ca": str(base / f.ca_cert.name), **{s: str(base / f.client(name, s).name) for s in ("crt", "key", "password")}}


def _agent_toml(m: dict, f: Files, agent: str) -> str:
    files = _installed(m, "agent_dir", f, agent)
    return (
        f"# fedmqtt agent {agent!r} of federation {m['federation']!r}, written by `fedmqtt provision`.\n"
        f"# Copy ca.crt, agent-{agent}.crt, agent-{agent}.key and agent-{agent}.password to\n"
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
    return (
        f"# fedmqtt aggregator of federation {m['federation']!r}, written by `fedmqtt provision`.\n"
        "# Copy ca.crt, aggregator.crt, aggregator.key, aggregator.password and signing.key to\n"
        f"# {m['aggregator_dir']} on the aggregator host (keys and password: mode 0600, owned by the\n"
        "# user that runs `fedmqtt aggregator`), then merge these keys into its aggregator.toml.\n"
        "\n"
        f"federation = {_toml_str(m['federation'])}\n"
        "\n"
        "[security]\n"
        f"signing_key = {_toml_str(str(Path(m['aggregator_dir']) / f.signing_key.name))}\n"
        "\n"
        + _broker_section(m, AGGREGATOR_USER, files)
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


def _issue_client(f: Files, m: dict, ca_key, ca_cert, name: str) -> None:
    """Certificate, key, password (and the password-file line) of the aggregator or one agent."""
    key, cert = issue(ca_key, ca_cert, name, m["federation"], days=m["days"])
    password = secrets.token_urlsafe(PASSWORD_BYTES)
    _write(f.client(name, "key"), _key_pem(key), 0o600)
    _write(f.client(name, "crt"), _cert_pem(cert), 0o644)
    _write(f.client(name, "password"), password + "\n", 0o600)
    _set_password(f.passwd, name, password)
    toml = _aggregator_toml(m, f) if name == AGGREGATOR_USER else _agent_toml(m, f, name)
    _write(f.client(name, "toml"), toml, 0o644)


def _check_agents(agents: list[str]) -> None:
    for a in agents:
        if not valid_id(a):
            raise ProvisionError(f"agent id {a!r} must match [A-Za-z0-9_-]{{1,64}}")
        if a == AGGREGATOR_USER:
            raise ProvisionError(f"{AGGREGATOR_USER!r} is the aggregator's user name, not an agent id")
    dup = sorted({a for a in agents if agents.count(a) > 1})
    if dup:
        raise ProvisionError(f"agent ids given twice: {', '.join(dup)}")


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
         aggregator_dir: str | None = None, force: bool = False) -> Files:
    """Provision a new federation into ``directory`` (see the module docstring)."""
    if not valid_id(federation):
        raise ProvisionError(f"federation id {federation!r} must match [A-Za-z0-9_-]{{1,64}}")
    _check_agents(agents)
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
        "agents": [],
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
    _write(f.acl, acl_text(federation), 0o644)
    _issue_client(f, m, ca_key, ca_cert, AGGREGATOR_USER)
    for a in agents:
        _issue_client(f, m, ca_key, ca_cert, a)
    m["agents"] = list(agents)
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
        old = json.loads(f.manifest.read_text()).get("agents", [])
    except (OSError, ValueError):
        old = []
    for a in old:
        if isinstance(a, str) and valid_id(a) and a != AGGREGATOR_USER:
            for s in ("crt", "key", "password", "toml"):
                f.client(a, s).unlink(missing_ok=True)


def add_agents(directory: str | Path, agents: list[str], force: bool = False) -> Files:
    """Add agents to a provisioned federation: only their files and password-file lines are written."""
    _check_agents(agents)
    f = Files(Path(directory).absolute())
    ca_key, ca_cert, m = _load_ca(f)
    users = {ln.split(":", 1)[0] for ln in _passwd_lines(f.passwd)}
    exists = [a for a in agents if a in users or f.client(a, "crt").exists()]
    if exists and not force:
        raise ProvisionError(
            f"already provisioned: {', '.join(exists)} (--force issues a new password and certificate;"
            " the old ones stop working once the broker reloads the password file)")
    for a in agents:
        _issue_client(f, m, ca_key, ca_cert, a)
        if a not in m["agents"]:
            m["agents"].append(a)
        _write(f.manifest, json.dumps(m, indent=2) + "\n", 0o644)
    return f


# -- command line -------------------------------------------------------------

EXAMPLE = """examples:
  fedmqtt provision init --dir fedmqtt-pki --fed plant-7 --agents 3 --broker-host mqtt.example.com
  fedmqtt provision init --dir fedmqtt-pki --fed plant-7 --agent pi-kitchen --agent pi-garage
  fedmqtt provision add-agent --dir fedmqtt-pki --agent pi-attic

Then install the broker's files (deploy/mosquitto/README.md) and hand each device
ca.crt and its agent-<id>.* files.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedmqtt provision",
        description="Create the CA, certificates, MQTT passwords, ACL and signing key of a secured federation.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="action", required=True, metavar="{init,add-agent}")
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
    i.add_argument("--force", action="store_true", help="replace an existing CA and everything issued from it")
    a = sub.add_parser("add-agent", help="add agents to a provisioned federation (re-uses its CA)")
    a.add_argument("--dir", required=True, help="the directory `provision init` wrote")
    a.add_argument("--agent", action="append", required=True, metavar="NAME", help="agent id (repeatable)")
    a.add_argument("--force", action="store_true", help="re-issue an agent that exists (new password and certificate)")
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
            f = init(args.dir, args.federation, agents, args.broker_host or None, args.port, args.days,
                     args.ca_days, args.agent_dir, args.aggregator_dir, args.force)
            m = json.loads(f.manifest.read_text())
            print(f"provisioned federation {m['federation']!r} in {f.dir}: CA, broker "
                  f"({', '.join(m['broker_hosts'])}), aggregator, {len(agents)} agent(s)")
        else:
            f = add_agents(args.dir, args.agent, args.force)
            print(f"added {', '.join(args.agent)} to {f.dir}; reload the broker's password file "
                  "(install passwd, then `systemctl reload mosquitto`)")
        print(f"model-signing public key (agents pin it): {f.signing_pub.read_text().strip()}")
        return 0
    except (ProvisionError, OSError) as exc:
        sys.stderr.write(f"fedmqtt provision: error: {exc}\n")
        return 2
