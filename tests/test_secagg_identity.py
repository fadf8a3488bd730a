"""Signed key advertisements in a provisioned federation (edge_agent/secagg/identity.py).

Without them an aggregator that lies could hand a device peers whose keys
it holds itself. Here every device signs its round keys with its
provisioned certificate (``fedmqtt provision``), and both the aggregator
and each device refuse advertisements that do not verify against the
federation's CA for exactly that device, federation, round and attempt.
The certificates come from the real provisioning code; the last test runs
a round over the production broker config (TLS, passwords, ACL).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import tomllib

import numpy as np
import pytest

from aggregator.provision import AGGREGATOR_USER, Files, broker_files, init
from aggregator.secagg import SecAggReject
from edge_agent import wire
from edge_agent.agent_config import AgentConfig
from edge_agent.cli import secagg_identity
from edge_agent.config import BrokerConfig, from_dict
from edge_agent.secagg import crypto
from edge_agent.secagg import messages as M
from edge_agent.secagg.client import SecAggError
from edge_agent.secagg.identity import DeviceIdentity, PeerVerifier, signed_bytes

from .test_secagg import FED, Harness, _same, _state

NAMES = [f"d{i:02d}" for i in range(6)]


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Files:
    return init(tmp_path_factory.mktemp("pki"), FED, NAMES)


@pytest.fixture(scope="module")
def rogue(tmp_path_factory) -> Files:
    """Another CA issuing a certificate with our device's name and federation."""
    return init(tmp_path_factory.mktemp("rogue"), FED, ["d01"])


@pytest.fixture(scope="module")
def other_fed(pki):
    """A certificate from our own CA for a device named d01 of another federation (one CA may serve several)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from aggregator.provision import issue

    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    return issue(ca_key, ca_cert, "d01", "other")


def identity(f: Files, name: str) -> DeviceIdentity:
    return DeviceIdentity(str(f.client(name, "crt")), str(f.client(name, "key")))


@pytest.fixture(scope="module")
def identities(pki):
    return {a: identity(pki, a) for a in NAMES}


@pytest.fixture(scope="module")
def verifier(pki):
    return PeerVerifier(str(pki.ca_cert), FED)


def test_a_signed_round_gives_the_exact_sum_and_every_advertisement_carries_its_proof(identities, verifier):
    h = Harness(n=6, dim=40, identities=identities, verifier=verifier)
    srv = h.run()
    assert srv.stage == "done" and np.array_equal(srv.sum_int, sum(h.ks.values()).astype(np.uint64))
    for a in NAMES:
        keys = h.seen[a][0]
        assert keys.sig and keys.cert == identities[a].cert_der
        verifier.verify(a, signed_bytes(FED, 1, 0, a, keys.c_pk, keys.s_pk), keys.sig, keys.cert)


def _forged(kind: str, h: Harness, identities, rogue, other_fed) -> M.SAKeys:
    """d01's advertisement, spoiled in one way."""
    a = "d01"
    msg = h.clients[a].advertise()
    data = signed_bytes(FED, 1, 0, a, msg.c_pk, msg.s_pk)
    if kind == "unsigned":
        msg.sig = msg.cert = b""
    elif kind == "another_devices_certificate":  # d02 signs keys it claims are d01's
        msg.sig, msg.cert = identities["d02"].sign(data), identities["d02"].cert_der
    elif kind == "rogue_ca":
        rogue_id = identity(rogue, a)
        msg.sig, msg.cert = rogue_id.sign(data), rogue_id.cert_der
    elif kind == "other_federation":
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key, cert = other_fed
        msg.sig, msg.cert = key.sign(data, ec.ECDSA(hashes.SHA256())), cert.public_bytes(serialization.Encoding.DER)
    elif kind == "key_swapped_after_signing":
        msg.s_pk = crypto.new_keypair()[1]
    elif kind == "signed_for_another_round":
        msg.sig = identities[a].sign(signed_bytes(FED, 2, 0, a, msg.c_pk, msg.s_pk))
    elif kind == "garbage_certificate":
        msg.cert = b"\x30\x03\x02\x01\x00"
    return msg


FORGERIES = {
    "unsigned": "unsigned_keys",
    "another_devices_certificate": "wrong_identity",
    "rogue_ca": "untrusted_certificate",
    "other_federation": "wrong_identity",
    "key_swapped_after_signing": "bad_signature",
    "signed_for_another_round": "bad_signature",
    "garbage_certificate": "bad_certificate",
}


@pytest.mark.parametrize("kind", sorted(FORGERIES))
def test_the_aggregator_drops_an_advertisement_that_does_not_verify_and_changes_nothing(
        kind, identities, verifier, rogue, other_fed):
    h = Harness(n=6, dim=10, identities=identities, verifier=verifier)
    forged = M.decode(M.encode(_forged(kind, h, identities, rogue, other_fed)), fed=FED, kinds=M.DEVICE_KINDS)
    before = _state(h.srv)
    with pytest.raises(SecAggReject) as exc:
        h.srv.receive("d01", forged, 0.0)
    assert exc.value.reason == FORGERIES[kind] and _same(before, _state(h.srv))
    h.srv.receive("d01", h.clients["d01"].advertise(), 0.0)  # the genuine one still counts
    assert "d01" in h.srv.keys


def _peers_for(h: Harness, target: str) -> M.SAPeers:
    pubs = [p for a in NAMES for p in h.srv.receive(a, h.clients[a].advertise(), 0.0)]
    return next(M.decode(p.payload, fed=FED, kinds=M.SERVER_KINDS) for p in pubs
                if p.topic.split("/")[-2] == target)


@pytest.mark.parametrize("kind", sorted(FORGERIES))
def test_a_device_shares_nothing_when_a_lying_aggregator_substitutes_a_peers_keys(
        kind, identities, verifier, rogue, other_fed):
    """The aggregator is the adversary here: it relays d01's keys spoiled; d00 checks them itself."""
    h = Harness(n=6, dim=10, identities=identities, verifier=verifier)
    peers = _peers_for(h, "d00")
    forged = _forged(kind, h, identities, rogue, other_fed)
    proof = (forged.sig, forged.cert) if forged.sig else ()
    peers.peers["d01"] = (forged.c_pk, forged.s_pk, *proof)
    peers = M.decode(M.encode(peers), fed=FED, kinds=M.SERVER_KINDS)
    with pytest.raises(SecAggError) as exc:
        h.clients["d00"].on_peers(peers)
    assert exc.value.reason == FORGERIES[kind] and h.clients["d00"].stage == "keys"


def test_a_device_refuses_keys_the_aggregator_made_up_and_signed_with_a_certificate_it_holds(identities, verifier):
    """Even a valid certificate of the federation (here the aggregator's own) does not vouch for a device."""
    h = Harness(n=6, dim=10, identities=identities, verifier=verifier)
    peers = _peers_for(h, "d00")
    agg = identities["d05"]  # any certificate the liar may hold: a device's or its own
    c_pk, s_pk = crypto.new_keypair()[1], crypto.new_keypair()[1]
    peers.peers["d01"] = (c_pk, s_pk, agg.sign(signed_bytes(FED, 1, 0, "d01", c_pk, s_pk)), agg.cert_der)
    with pytest.raises(SecAggError) as exc:
        h.clients["d00"].on_peers(peers)
    assert exc.value.reason == "wrong_identity"


def test_an_expired_certificate_is_refused(identities, verifier):
    me = identities["d01"]
    c, s = crypto.new_keypair()[1], crypto.new_keypair()[1]
    data = signed_bytes(FED, 1, 0, "d01", c, s)
    verifier.verify("d01", data, me.sign(data), me.cert_der)
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=20 * 365)
    with pytest.raises(SecAggError) as exc:
        verifier.verify("d01", data, me.sign(data), me.cert_der, now=later)
    assert exc.value.reason == "expired_certificate"


def test_signature_and_certificate_are_bounded_and_come_together_on_the_wire(identities):
    keys = M.SAKeys(FED, 1, 0, "d00", crypto.new_keypair()[1], crypto.new_keypair()[1])
    for sig, cert in [(b"s" * 81, identities["d00"].cert_der), (b"s" * 70, b"c" * 4097), (b"s" * 70, b""),
                      (b"", identities["d00"].cert_der)]:
        keys.sig, keys.cert = sig, cert
        with pytest.raises(wire.WireError) as exc:
            M.decode(M.encode(keys), fed=FED, kinds=M.DEVICE_KINDS)
        assert exc.value.reason == "bad_field"
    peers = M.SAPeers(FED, 1, 0, {"d01": (keys.c_pk, keys.s_pk, b"s" * 70)})
    with pytest.raises(wire.WireError):
        M.decode(M.encode(peers), fed=FED, kinds=M.SERVER_KINDS)


def test_the_agent_takes_its_identity_from_its_provisioned_config(pki):
    snippet = tomllib.loads(pki.client("d00", "toml").read_text())
    cfg = from_dict(AgentConfig, {**snippet, "data": "local.npz"})
    ident, ver = secagg_identity(cfg)
    assert ident.common_name == "d00" and ver.federation == FED
    assert secagg_identity(dataclasses.replace(
        cfg, security=dataclasses.replace(cfg.security, sign_secagg_keys=False))) == (None, None)
    plain = dataclasses.replace(cfg, broker=BrokerConfig())  # not provisioned: nothing to sign with
    assert secagg_identity(plain) == (None, None)
    with pytest.raises(ValueError, match="certificate of 'd00', not of agent 'd01'"):
        secagg_identity(dataclasses.replace(cfg, agent_id="d01"))


# -- over the production broker ------------------------------------------------------------


@pytest.mark.broker
def test_a_provisioned_federation_runs_signed_secure_aggregation_over_tls_and_drops_an_unsigned_device(
        pki, tmp_path, start_aggregator):
    """Real agents from the provisioned configs; d05 has no identity and advertises unsigned keys."""
    from aggregator.broker import LocalBroker
    from aggregator.config import AggregatorConfig
    from aggregator.datasets import federated_digits
    from edge_agent.agent import AgentCore, AgentRunner
    from edge_agent.data import split_holdout
    from edge_agent.mqtt import Loop

    from .conftest import WAIT_S
    from .test_security_broker import PROD_CONF

    broker = LocalBroker(conf=PROD_CONF, overrides={k: str(v) for k, v in broker_files(pki.dir).items()}).start()
    try:
        agg_snippet = tomllib.loads(pki.client(AGGREGATOR_USER, "toml").read_text())
        cfg = from_dict(AggregatorConfig, {
            **agg_snippet, "rounds": 1, "state_dir": str(tmp_path / "state"),
            "model": {"kind": "softmax", "n_features": 64, "n_outputs": 10},
            "round": {"min_agents": 6, "quorum": 1, "timeout": 4.0},
            "secagg": {"mode": "secagg", "stage_timeout": WAIT_S},
            "security": {**agg_snippet.get("security", {}), "rate_limit": 0.0},
        })
        cfg = dataclasses.replace(cfg, broker=dataclasses.replace(cfg.broker, host=broker.host, port=broker.port))
        ra = start_aggregator(cfg)
        data = federated_digits(6, "iid", 0.5, 0)
        loop = Loop()
        runners = []
        for i, (a, d) in enumerate(zip(NAMES, data.agents)):
            acfg = from_dict(AgentConfig, {**tomllib.loads(pki.client(a, "toml").read_text()), "data": "x.npz"})
            acfg = dataclasses.replace(acfg, broker=dataclasses.replace(acfg.broker, host=broker.host,
                                                                       port=broker.port))
            ident, ver = secagg_identity(acfg)
            if a == "d05":
                ident = None  # an impostor without the device's key cannot sign
            core = AgentCore(agent_id=a, fed=FED, data=d, seed=i, verifier=None, secagg_identity=ident,
                             secagg_verifier=ver)
            runners.append(AgentRunner(loop, core, acfg.broker))
        for r in runners:
            r.start()
        loop.start(name="signed-secagg-agents")
        try:
            ra.wait_finished()
        finally:
            loop.stop()
            loop.thread.join(10)
        summary = ra.rounds.get_nowait().summary
        assert summary.participants == 5
        assert ra.coordinator.rejected["secagg_unsigned_keys"] == 1
        honest = [r.core for r in runners if r.core.agent_id != "d05"]
        assert all(not c.rejected for c in honest), [dict(c.rejected) for c in honest]
    finally:
        broker.close()
