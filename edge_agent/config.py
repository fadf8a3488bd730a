"""The one config loader: TOML files into dataclasses, every key overridable by a flag.

A config class is a dataclass whose fields are scalars (str, int, float,
bool), lists of ints or strings, or nested dataclasses (TOML tables). Each
leaf key ``section.key`` becomes a flag ``--section-key``. Unknown keys,
wrong types and invalid values raise :class:`ConfigError` with a message
that names the key, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem; the message names the file, the key and the problem."""


# MQTT protocol versions a client may speak ([broker] protocol). "5" is the
# default and what every feature is built on; "3.1.1" is for brokers that have
# no MQTT 5, above all a NATS server cluster (2.9 refuses an MQTT 5 CONNECT).
PROTOCOLS = ("5", "3.1.1")


@dataclass
class BrokerConfig:
    """Where the MQTT broker is and how to log in."""

    host: str = field(default="127.0.0.1", metadata={"help": "broker host name or address"})
    port: int = field(default=1883, metadata={"help": "broker TCP port"})
    keepalive: int = field(default=30, metadata={"help": "MQTT keepalive in seconds"})
    username: str = field(default="", metadata={"help": "MQTT user name (empty: anonymous)"})
    password: str = field(default="", metadata={"help": "MQTT password"})
    password_file: str = field(
        default="", metadata={"help": "read the MQTT password from this file (e.g. a systemd credential)"}
    )
    tls: bool = field(default=False, metadata={"help": "connect with TLS"})
    ca_file: str = field(default="", metadata={"help": "CA certificate that signed the broker's (TLS)"})
    cert_file: str = field(default="", metadata={"help": "client certificate (TLS client authentication)"})
    key_file: str = field(default="", metadata={"help": "client private key (TLS client authentication)"})
    max_packet_size: int = field(default=0, metadata={
        "help": "largest MQTT packet to send, in bytes (0: what the broker announces); larger models and updates "
                "go in chunks"})
    protocol: str = field(default="5", metadata={
        "help": "MQTT protocol version: 5, or 3.1.1 for brokers without MQTT 5 (a NATS server): no signatures, no "
                "session expiry, no announced packet limit (set max_packet_size); docs/PROTOCOL.md §1.1"})
    failover: list[str] = field(default_factory=list, metadata={
        "help": "more HOST:PORT addresses of the same broker cluster, tried in turn (after host:port) when the "
                "current one is unreachable or drops the connection"})

    def secret(self) -> str:
        """The password: from password_file when set, else the password key."""
        if self.password_file:
            try:
                return Path(self.password_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"broker.password_file: cannot read {self.password_file}: {exc}") from None
        return self.password

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.password and self.password_file:
            out.append(("password_file", "set password or password_file, not both"))
        if (self.cert_file or self.key_file or self.ca_file) and not self.tls:
            out.append(("tls", "certificate files are set but tls = false"))
        if bool(self.cert_file) != bool(self.key_file):
            out.append(("key_file" if self.cert_file else "cert_file", "a client certificate needs both cert_file and key_file"))
        if not self.host:
            out.append(("host", "must not be empty"))
        if not 1 <= self.port <= 65535:
            out.append(("port", f"must be in 1..65535, got {self.port}"))
        if self.max_packet_size and self.max_packet_size < 64 * 1024:
            out.append(("max_packet_size", f"must be 0 (the broker's) or at least 65536 bytes, got {self.max_packet_size}"))
        if not 5 <= self.keepalive <= 3600:
            out.append(("keepalive", f"must be in 5..3600 seconds, got {self.keepalive}"))
        if self.protocol not in PROTOCOLS:
            out.append(("protocol", f"must be one of {', '.join(repr(p) for p in PROTOCOLS)} (a string), "
                                    f"got {self.protocol!r}"))
        for i, text in enumerate(self.failover):
            try:
                parse_hostport(text)
            except ConfigError:
                out.append((f"failover[{i}]", f"expected HOST:PORT, got {text!r}"))
        return out

    @property
    def mqtt5(self) -> bool:
        """Whether clients speak MQTT 5 (else 3.1.1: no properties, clean session instead of session expiry)."""
        return self.protocol == "5"

    def addresses(self) -> list[tuple[str, int]]:
        """(host, port) of the broker and then of its ``failover`` nodes, in the order they are tried."""
        return [(self.host, self.port), *(parse_hostport(t) for t in self.failover)]


def leaf_fields(cls: type, prefix: str = "") -> list[tuple[str, type, dataclasses.Field]]:
    """Every leaf key of a config class as (dotted key, type, field)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue  # derived state, not a key
        typ = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(typ):
            out.extend(leaf_fields(typ, key + "."))
        else:
            out.append((key, typ, f))
    return out


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build ``cls`` from a parsed TOML mapping, checking every key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in names:
            raise ConfigError(f"{where}: unknown key '{key}' (known keys: {', '.join(sorted(names))})")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        typ = hints[f.name]
        value = data[f.name]
        key = f"{where}.{f.name}" if where != "config" else f.name
        if dataclasses.is_dataclass(typ):
            kwargs[f.name] = from_dict(typ, value, key)
        else:
            kwargs[f.name] = _check_type(key, typ, value)
    obj = cls(**kwargs)
    check(obj, where)
    return obj


def check(obj: Any, where: str = "config") -> None:
    """Run ``problems()`` of ``obj`` and of its nested sections; raise on the first.

    A config built in Python is checked for attributes that are not keys
    too: ``cfg.round.rounds = 5`` (the key is ``cfg.rounds``) would
    otherwise be silently ignored.
    """
    names = {f.name for f in dataclasses.fields(obj)}
    stray = sorted(k for k in vars(obj) if k not in names)
    if stray:
        name = stray[0] if where == "config" else f"{where}.{stray[0]}"
        raise ConfigError(f"{name}: unknown key (known keys: {', '.join(sorted(n for n in names if n[0] != '_'))})")
    if hasattr(obj, "problems"):
        for key, problem in obj.problems():
            name = key if where == "config" else f"{where}.{key}"
            raise ConfigError(f"{name}: {problem}")
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        sub = getattr(obj, f.name)
        if dataclasses.is_dataclass(sub):
            check(sub, f.name if where == "config" else f"{where}.{f.name}")


def _check_type(key: str, typ: Any, value: Any) -> Any:
    origin = typing.get_origin(typ)
    if origin is dict or typ is dict:
        # A free-form table (e.g. a custom model's options): its owner checks it.
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__} {value!r}")
        return dict(value)
    if origin in (list, tuple):
        (item,) = typing.get_args(typ)[:1]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        items = [_check_type(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {typ}")  # a bug in a config class, not in the file


def parse_bool(text: str) -> bool:
    """A flag's true/false text (1/0, yes/no, on/off too); argparse type of the non-config switches."""
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_flag(key: str, typ: Any, text: str) -> Any:
    """Turn a flag's text into the TOML value it stands for."""
    origin = typing.get_origin(typ)
    if origin in (list, tuple):
        (item,) = typing.get_args(typ)[:1]
        parts = [p.strip() for p in text.split(",") if p.strip()]
        return [_parse_flag(key, item, p) for p in parts]
    try:
        if typ is bool:
            try:
                return parse_bool(text)
            except argparse.ArgumentTypeError:
                raise ValueError(text) from None
        if typ is int:
            return int(text)
        if typ is float:
            return float(text)
    except ValueError:
        raise ConfigError(f"--{key.replace('.', '-').replace('_', '-')}: cannot read {text!r} as {typ.__name__}") from None
    return text


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add ``--section-key`` for every leaf key of ``cls``."""
    group = parser.add_argument_group("config keys (override the file)")
    for key, typ, f in leaf_fields(cls):
        if typing.get_origin(typ) is dict or typ is dict:
            continue  # a table has no one-line form: set it in the file
        flag = "--" + key.replace(".", "-").replace("_", "-")
        help_text = f.metadata.get("help", "")
        if typ is bool:
            # `--exit-when-done` alone means true, as a switch would; `--exit-when-done false` works too.
            group.add_argument(flag, dest="cfg:" + key, metavar="BOOL", nargs="?", const="true", default=None,
                               help=help_text)
            continue
        group.add_argument(flag, dest="cfg:" + key, metavar=_metavar(typ), default=None, help=help_text)


def _metavar(typ: Any) -> str:
    origin = typing.get_origin(typ)
    if origin in (list, tuple):
        return "A,B,..."
    return {int: "INT", float: "NUM", bool: "BOOL", str: "TEXT"}.get(typ, "VALUE")


def flag_overrides(args: argparse.Namespace) -> dict[str, str]:
    """The config keys given as flags, as {dotted key: text}."""
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}


def load(cls: type[T], path: str | Path | None, overrides: dict[str, str] | None = None) -> T:
    """Load ``cls`` from a TOML file (or defaults when ``path`` is None) plus flag overrides."""
    data: dict[str, Any] = {}
    where = "config"
    if path:
        p = Path(path)
        try:
            with p.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"{p}: no such config file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: invalid TOML: {exc}") from None
    types = {key: typ for key, typ, _ in leaf_fields(cls)}
    for key, text in (overrides or {}).items():
        if key not in types:
            raise ConfigError(f"unknown config key {key!r}")
        *sections, leaf = key.split(".")
        node = data
        for s in sections:
            node = node.setdefault(s, {})
        node[leaf] = _parse_flag(key, types[key], text)
    try:
        return from_dict(cls, data, where)
    except ConfigError as exc:
        if path:
            raise ConfigError(f"{path}: {exc}") from None
        raise


def config_of(cls: type[T], config: Any, example: str) -> T:
    """A checked ``cls`` from an instance, a TOML file (``str``/``Path``) or a dict of its keys (the Python API)."""
    if isinstance(config, cls):
        check(config)
        return config
    if isinstance(config, (str, Path)):
        return load(cls, config)
    if isinstance(config, dict) or hasattr(config, "keys"):
        return from_dict(cls, dict(config))
    raise ConfigError(f"config must be a {cls.__name__}, a path to {example} or a dict, got {type(config).__name__}")


def parse_hostport(text: str) -> tuple[str, int]:
    """``HOST:PORT`` to a tuple; raises ConfigError naming the flag's problem."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"--broker: expected HOST:PORT, got {text!r}")
    return host, int(port)
