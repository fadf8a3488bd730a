"""Signed key advertisements: the provisioned identity of each device vouches for its round keys.

Without signatures, secure aggregation protects against an aggregator that
follows the protocol and looks (honest but curious). An aggregator that
lies could hand a device made-up "peers" whose keys it holds, and learn
the device's shares. In a provisioned federation (``fedmqtt provision``:
every device has a client certificate from the federation's CA, CN = its
id, OU = the federation) each device therefore signs its two round keys
with its certificate's private key, sends the certificate beside them, and
refuses to share with any peer whose advertisement does not verify against
the CA for exactly that peer id, federation, round and attempt
(Bonawitz et al. 2017, §6: the active-adversary variant's PKI).

What is signed (ECDSA P-256 with SHA-256, DER signature)::

    "fedmqtt-secagg-keys" 0x00 <fed>|<round>|<attempt> 0x00 <agent id> 0x00 c_pk s_pk

The certificate travels as DER. Verified certificates are cached by their
bytes, so a device checks a peer's certificate chain once, not every round.
"""

from __future__ import annotations

import datetime as dt
import hashlib

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .client import SecAggError, context

# Peers' certificates checked and kept; a fleet larger than this re-checks
# some certificates, which costs time, not correctness.
MAX_CACHED_CERTS = 4096
_LABEL = b"fedmqtt-secagg-keys"


def signed_bytes(fed: str, rnd: int, attempt: int, agent: str, c_pk: bytes, s_pk: bytes) -> bytes:
    """What a device's signature over its advertisement covers."""
    return b"\x00".join((_LABEL, context(fed, rnd, attempt), agent.encode(), c_pk + s_pk))


class DeviceIdentity:
    """This device's provisioned key and certificate (the TLS client certificate of ``fedmqtt provision``)."""

    def __init__(self, cert_file: str, key_file: str) -> None:
        with open(cert_file, "rb") as fh:
            cert = x509.load_pem_x509_certificate(fh.read())
        with open(key_file, "rb") as fh:
            key = serialization.load_pem_private_key(fh.read(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_file}: an EC private key is needed to sign secure-aggregation keys")
        if key.public_key().public_numbers() != cert.public_key().public_numbers():
            raise ValueError(f"{key_file} is not the private key of {cert_file}")
        self._key = key
        self.cert_der = cert.public_bytes(serialization.Encoding.DER)
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        self.common_name = str(names[0].value) if names else ""

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data, ec.ECDSA(hashes.SHA256()))


class PeerVerifier:
    """Checks peers' signed advertisements against the federation's CA."""

    def __init__(self, ca_file: str, federation: str) -> None:
        with open(ca_file, "rb") as fh:
            self.ca = x509.load_pem_x509_certificate(fh.read())
        self.federation = federation
        self._certs: dict[bytes, x509.Certificate] = {}  # sha256 of DER -> certificate whose chain was checked

    def _certificate(self, der: bytes) -> x509.Certificate:
        digest = hashlib.sha256(der).digest()
        cert = self._certs.get(digest)
        if cert is not None:
            return cert
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            raise SecAggError("bad_certificate", "not a DER certificate") from None
        try:
            cert.verify_directly_issued_by(self.ca)
        except (ValueError, TypeError, InvalidSignature):
            raise SecAggError("untrusted_certificate", "not issued by the federation's CA") from None
        try:
            usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            usage = None
        if usage is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
            raise SecAggError("untrusted_certificate", "not a device (client) certificate")
        if len(self._certs) >= MAX_CACHED_CERTS:
            self._certs.clear()
        self._certs[digest] = cert
        return cert

    def verify(self, agent: str, data: bytes, signature: bytes, cert_der: bytes,
               now: dt.datetime | None = None) -> None:
        """Raise SecAggError unless ``cert_der`` is the CA's valid certificate of ``agent`` and it signed ``data``."""
        if not signature or not cert_der:
            raise SecAggError("unsigned_keys", f"{agent}'s keys are not signed")
        cert = self._certificate(cert_der)
        now = now or dt.datetime.now(dt.timezone.utc)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise SecAggError("expired_certificate", f"{agent}'s certificate is not valid now")
        cn = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if cn != [agent]:
            raise SecAggError("wrong_identity", f"keys advertised as {agent} are signed by the certificate of {cn}")
        ou = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
        if ou != [self.federation]:
            raise SecAggError("wrong_identity", f"{agent}'s certificate is for federation {ou}, not "
                                                f"{self.federation!r}")
        public = cert.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise SecAggError("bad_certificate", f"{agent}'s certificate does not hold an EC key")
        try:
            public.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise SecAggError("bad_signature", f"{agent}'s keys do not match their signature") from None
