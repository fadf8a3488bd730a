"""Ed25519 signatures on what the aggregator publishes (model, model/onnx, task).

The signature covers the topic and the payload (``topic || 0x00 || payload``),
so a signed task cannot be replayed as a model, nor one federation's model on
another's topic. It travels beside the payload as MQTT v5 user properties
``sig`` (hex, 64 bytes) and ``key`` (hex of the 32-byte public key), so the
payload stays exactly what an unsigned reader expects, ONNX bytes included.

Agents pin the public keys they trust (``[security] trusted_keys``); with
any key pinned, an unsigned or badly signed model or task is dropped. The
``cryptography`` package does the work; a device that pins keys needs it
(``pip install 'fedmqtt[verify]'``), one that does not never imports it.
"""

from __future__ import annotations

import re

SIG_PROPERTY = "sig"
KEY_PROPERTY = "key"
_HEX_KEY = re.compile(r"^[0-9a-fA-F]{64}$")


class SignatureError(ValueError):
    """A message that must not be trusted; ``reason`` is a short code for counters."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def signed_bytes(topic: str, payload: bytes) -> bytes:
    """What a signature covers."""
    return topic.encode() + b"\x00" + bytes(payload)


def valid_public_key(text: str) -> bool:
    """True for a raw Ed25519 public key written as 64 hex digits."""
    return bool(_HEX_KEY.match(text))


class Verifier:
    """Checks signatures against a pinned set of public keys."""

    def __init__(self, trusted_keys: list[str]) -> None:
        try:
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
        except ImportError:
            raise RuntimeError(
                "verifying signed models needs the cryptography package: pip install 'fedmqtt[verify]'"
            ) from None
        bad = [k for k in trusted_keys if not valid_public_key(k)]
        if bad:
            raise ValueError(f"trusted keys must be 64 hex digits (raw Ed25519 public keys), got {bad}")
        self._cls = Ed25519PublicKey
        self._keys = {k.lower(): Ed25519PublicKey.from_public_bytes(bytes.fromhex(k)) for k in trusted_keys}

    @property
    def trusted(self) -> list[str]:
        """The pinned keys, as hex."""
        return sorted(self._keys)

    def add(self, keys: list[str]) -> list[str]:
        """Trust more keys (from a keys message a trusted key signed); returns the new ones."""
        new = [k.lower() for k in keys if valid_public_key(k) and k.lower() not in self._keys]
        for k in new:
            self._keys[k] = self._cls.from_public_bytes(bytes.fromhex(k))
        return new

    def verify(self, topic: str, payload: bytes, props: dict[str, str]) -> None:
        """Raise SignatureError unless a trusted key signed exactly this topic and payload."""
        from cryptography.exceptions import InvalidSignature

        sig, key = props.get(SIG_PROPERTY), props.get(KEY_PROPERTY, "").lower()
        if not sig:
            raise SignatureError("unsigned", f"{topic}: no signature")
        pub = self._keys.get(key)
        if pub is None:
            raise SignatureError("untrusted_key", f"{topic}: signed by key {key[:16]}..., not a trusted key")
        try:
            pub.verify(bytes.fromhex(sig), signed_bytes(topic, payload))
        except (InvalidSignature, ValueError):
            raise SignatureError("bad_signature", f"{topic}: the signature does not match") from None


class Signer:
    """Signs with the aggregator's Ed25519 private key (PKCS#8 PEM file)."""

    def __init__(self, key_file: str) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        with open(key_file, "rb") as fh:
            key = serialization.load_pem_private_key(fh.read(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{key_file}: not an Ed25519 private key")
        self._key = key
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.public_key = raw.hex()

    def properties(self, topic: str, payload: bytes) -> tuple[tuple[str, str], ...]:
        """The user properties that carry the signature of this publish."""
        sig = self._key.sign(signed_bytes(topic, payload))
        return ((SIG_PROPERTY, sig.hex()), (KEY_PROPERTY, self.public_key))
