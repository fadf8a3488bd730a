"""The cryptography of secure aggregation, on the ``cryptography`` package.

- key agreement: X25519, always through HKDF-SHA256 with a label and the
  round's context, never the raw shared secret;
- share encryption: AES-256-GCM, a fresh 96-bit nonce per message, the
  sender, recipient and round bound as associated data;
- mask expansion: the AES-256-CTR keystream of a 32-byte seed, read as
  little-endian uint32 and reduced mod 2^b (never numpy's generator).
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16


class CryptoError(ValueError):
    """Input that fails a cryptographic check; ``reason`` is a short code for counters."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def new_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw bytes (private, public)."""
    private = X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return private, public_key(private)


def public_key(private: bytes) -> bytes:
    """The raw X25519 public key of a raw private key."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def agree(private: bytes, public: bytes, label: bytes) -> bytes:
    """A 32-byte key both sides derive: HKDF-SHA256(X25519(private, public), info=label)."""
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:  # wrong length, or a low-order point giving an all-zero secret
        raise CryptoError("bad_key", str(exc)) from None
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=label).derive(shared)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """nonce || AES-GCM(key, nonce, plaintext, aad)."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """The plaintext of :func:`seal`; CryptoError("bad_ciphertext") if it was altered or is not for us."""
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise CryptoError("bad_ciphertext", f"{len(blob)} bytes is shorter than nonce and tag")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag:
        raise CryptoError("bad_ciphertext", "authentication failed") from None


def expand_mask(seed: bytes, n: int, bits: int) -> np.ndarray:
    """``n`` pseudo-random values mod 2^bits (uint64) from the AES-256-CTR keystream of ``seed``."""
    if len(seed) != KEY_BYTES:
        raise CryptoError("bad_seed", f"a mask seed is {KEY_BYTES} bytes, got {len(seed)}")
    enc = Cipher(algorithms.AES(seed), modes.CTR(b"\x00" * 16)).encryptor()
    stream = enc.update(b"\x00" * (4 * n)) + enc.finalize()
    words = np.frombuffer(stream, dtype="<u4").astype(np.uint64)
    return words & np.uint64((1 << bits) - 1)
