"""Secure aggregation, the pure parts: Shamir, crypto, quantization, and the protocol run in process.

The device client and the aggregator round are sans-I/O, so the whole
protocol runs here message by message (through the real codec) with
dropouts at every stage and hostile messages; tests/test_secagg_broker.py
runs it over a real mosquitto.
"""

from __future__ import annotations

import itertools
import math

import dp_accounting as dpa
import numpy as np
import pytest
from dp_accounting import rdp
from scipy import stats

from aggregator.secagg import SecAggReject, make_round, neighbour_graph, round_params
from edge_agent import wire
from edge_agent.secagg import crypto, shamir
from edge_agent.secagg import messages as M
from edge_agent.secagg.client import SecAggClient, SecAggError
from edge_agent.secagg.quantize import dequantize_sum, levels, modulus_bits, quantize

from .conftest import deliver_task

FED = "sa"
QBITS, RANGE = 16, 1.0


# -- Shamir -------------------------------------------------------------------------

def test_any_t_shares_recover_the_secret():
    secret = bytes(range(32))
    xs = [1, 2, 3, 4, 5, 6, 7]
    shares = shamir.split(secret, xs, 4)
    for subset in itertools.combinations(xs, 4):
        assert shamir.combine({x: shares[x] for x in subset}, 4, 32) == secret
    with pytest.raises(shamir.ShamirError):
        shamir.combine({x: shares[x] for x in xs[:3]}, 4, 32)


def test_t_minus_one_shares_are_consistent_with_every_secret():
    # For t - 1 shares and ANY candidate secret there is a degree t-1 polynomial through
    # (0, candidate) and the shares: interpolating it back at the share points gives the shares.
    t, xs = 3, [1, 2, 3, 4, 5]
    shares = shamir.split(b"\x01" * 32, xs, t)
    known = {x: int.from_bytes(shares[x], "big") for x in (2, 5)}
    for candidate in (0, 1, 12345, shamir.PRIME - 1):
        pts = [(0, candidate)] + list(known.items())

        def poly(x):  # Lagrange through the t points
            total = 0
            for i, (xi, yi) in enumerate(pts):
                num = den = 1
                for j, (xj, _) in enumerate(pts):
                    if j != i:
                        num = num * (x - xj) % shamir.PRIME
                        den = den * (xi - xj) % shamir.PRIME
                total = (total + yi * num * pow(den, -1, shamir.PRIME)) % shamir.PRIME
            return total

        assert all(poly(x) == y for x, y in known.items())


def test_shamir_refuses_bad_input():
    with pytest.raises(shamir.ShamirError):
        shamir.split(b"x" * 65, [1, 2], 2)
    with pytest.raises(shamir.ShamirError):
        shamir.split(b"x", [1, 1], 2)
    with pytest.raises(shamir.ShamirError):
        shamir.combine({1: b"\xff" * shamir.SHARE_BYTES, 2: b"\x00" * shamir.SHARE_BYTES}, 2, 32)


# -- crypto ---------------------------------------------------------------------------

def test_key_agreement_is_symmetric_and_a_tampered_ciphertext_fails():
    a_sk, a_pk = crypto.new_keypair()
    b_sk, b_pk = crypto.new_keypair()
    k1, k2 = crypto.agree(a_sk, b_pk, b"label"), crypto.agree(b_sk, a_pk, b"label")
    assert k1 == k2 and crypto.agree(a_sk, b_pk, b"other") != k1
    blob = crypto.seal(k1, b"secret share", b"aad")
    assert crypto.open_sealed(k2, blob, b"aad") == b"secret share"
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    for bad_blob, aad in ((tampered, b"aad"), (blob, b"other aad")):
        with pytest.raises(crypto.CryptoError) as exc:
            crypto.open_sealed(k2, bad_blob, aad)
        assert exc.value.reason == "bad_ciphertext"


def test_masks_are_uniform_and_reproducible_from_the_seed():
    seed = bytes(32)
    m = crypto.expand_mask(seed, 100_000, 20)
    assert np.array_equal(m, crypto.expand_mask(seed, 100_000, 20))
    assert m.max() < 2 ** 20
    counts = np.bincount((m >> np.uint64(14)).astype(np.int64), minlength=64)  # 64 equal bins
    assert stats.chisquare(counts).pvalue > 1e-4


# -- quantization ------------------------------------------------------------------------

def test_quantization_is_unbiased_and_the_modulus_never_wraps():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, 200_000)
    q = quantize(x, RANGE, 8, rng.random(x.size))
    back = q * (2 * RANGE / levels(8)) - RANGE
    assert abs(float(np.mean(back - x))) < 3 * (2 / 255) / math.sqrt(x.size)
    assert np.abs(back - x).max() <= 2 / 255 + 1e-12
    for n in (1, 2, 3, 10, 100, 1000):
        assert n * levels(QBITS) < 2 ** modulus_bits(QBITS, n)
    assert dequantize_sum(np.array([2 * levels(QBITS)]), 2, RANGE, QBITS)[0] == pytest.approx(2 * RANGE)


# -- the protocol in process --------------------------------------------------------------

def grid_inputs(names, dim, seed=0):
    """Updates exactly on the quantization grid: rounding is deterministic, so sums can be checked exactly."""
    rng = np.random.default_rng(seed)
    ks = {a: rng.integers(0, levels(QBITS) + 1, dim) for a in names}
    xs = {a: ks[a] * (2 * RANGE / levels(QBITS)) - RANGE for a in names}
    return ks, xs


class Harness:
    """Devices and the aggregator round exchanging encoded messages; devices can drop at any stage."""

    def __init__(self, n=10, dim=500, mode="secagg", degree=0, threshold=0, max_weight=0, weights=None,
                 identities=None, verifier=None):
        self.names = [f"d{i:02d}" for i in range(n)]
        self.params = round_params(mode, n, degree, threshold, QBITS, RANGE, 0.0, max_weight)
        self.ks, self.xs = grid_inputs(self.names, dim)
        self.srv = make_round(FED, 1, 0, self.names, self.params, degree, dim, 100.0, 10.0, verifier=verifier)
        self.clients = {a: SecAggClient(FED, a, 1, 0, self.names, self.params, self.xs[a],
                                        weight=(weights or {}).get(a, 1),
                                        identity=(identities or {}).get(a), verifier=verifier)
                        for a in self.names}
        self.dead: set[str] = set()
        self.seen: dict[str, list] = {}  # what each device sent, by stage

    def run(self, drop_after: dict[str, int] | None = None):
        """Run to the end; ``drop_after[a] = s``: device a dies after sending its stage-s message (1..4)."""
        drop_after = drop_after or {}
        outgoing = [(a, self.clients[a].advertise()) for a in self.names]
        stage = 1
        while outgoing:
            pubs = []
            for a, msg in outgoing:
                self.seen.setdefault(a, []).append(msg)
                pubs += self.srv.receive(a, M.decode(M.encode(msg), fed=FED, kinds=M.DEVICE_KINDS), 0.0)
            for a, s in drop_after.items():
                if s == stage and a not in self.dead:
                    self.dead.add(a)
                    pubs += self.srv.agent_offline(a, 0.0)  # the last will
            outgoing = []
            for p in pubs:
                a = p.topic.split("/")[-2]
                if a in self.dead:
                    continue
                msg = M.decode(p.payload, fed=FED, kinds=M.SERVER_KINDS)
                c = self.clients[a]
                step = {M.SAPeers: c.on_peers, M.SARoute: c.on_route, M.SAUnmaskReq: c.on_unmask_req}[type(msg)]
                outgoing.append((a, step(msg)))
            stage += 1
        return self.srv


def test_ten_devices_the_unmasked_sum_is_the_exact_integer_sum():
    h = Harness(n=10)
    srv = h.run()
    assert srv.stage == "done" and srv.contributors == set(h.names)
    expected = sum(h.ks[a] for a in h.names)
    assert np.array_equal(srv.sum_int, expected.astype(np.uint64))
    np.testing.assert_allclose(srv.result, sum(h.xs[a] for a in h.names), atol=1e-9)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_thirty_percent_dropping_after_each_stage_still_gives_the_exact_sum_of_the_survivors(stage):
    h = Harness(n=10)
    dropped = h.names[:3]
    srv = h.run({a: stage for a in dropped})
    assert srv.stage == "done", srv.why
    # after keys or shares: not in the sum; after sending the masked input: in it
    contributors = set(h.names) - set(dropped) if stage < 3 else set(h.names)
    assert srv.contributors == contributors
    assert np.array_equal(srv.sum_int, sum(h.ks[a] for a in contributors).astype(np.uint64))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_below_the_threshold_the_round_aborts_and_reveals_nothing(stage):
    h = Harness(n=10)  # t = 5 of 9 peers
    srv = h.run({a: stage for a in h.names[:6]})
    assert srv.stage == "aborted" and srv.result is None and srv.total is None


def test_secagg_plus_with_50_devices_and_7_neighbours_gives_the_same_sum_as_full_secagg():
    plus, full = Harness(n=50, dim=200, mode="secagg+", degree=7), Harness(n=50, dim=200, mode="secagg")
    assert all(len(p) == 7 for p in plus.srv.peers.values())
    assert all(b in plus.srv.peers[a] for a in plus.srv.peers for b in plus.srv.peers[a])  # undirected
    s_plus, s_full = plus.run(), full.run()
    assert s_plus.stage == s_full.stage == "done"
    assert np.array_equal(s_plus.sum_int, s_full.sum_int)
    # and with dropouts after sharing keys (3 of 50: no neighbourhood of 7 can lose the 4 = t it needs,
    # whatever the random graph; SecAgg+ trades this robustness for O(k) cost, Bell et al. 2020)
    plus2 = Harness(n=50, dim=200, mode="secagg+", degree=7)
    srv = plus2.run({a: 2 for a in plus2.names[::17]})
    survivors = set(plus2.names) - set(plus2.names[::17])
    assert srv.stage == "done" and np.array_equal(srv.sum_int, sum(plus2.ks[a] for a in survivors).astype(np.uint64))


def test_neighbour_graphs_are_regular():
    names = [f"n{i}" for i in range(20)]
    for k in (2, 3, 4, 7):
        g = neighbour_graph(names, k)
        assert all(len(g[a]) == k and a not in g[a] for a in names)
    assert all(len(p) == 19 for p in neighbour_graph(names, 0).values())


def test_a_single_masked_vector_looks_uniform():
    h = Harness(n=10, dim=20_000)
    h.run()
    masked = h.seen[h.names[0]][2].masked.astype(np.int64)
    bits = h.params.bits
    counts = np.bincount(masked >> (bits - 6), minlength=64)
    assert stats.chisquare(counts).pvalue > 1e-4
    # while the input itself is far from uniform (all inputs are near the middle of the range)
    assert np.corrcoef(masked, h.ks[h.names[0]])[0, 1] < 0.05


def test_a_tampered_share_is_counted_and_the_round_still_completes():
    h = Harness(n=6)
    srv = h.srv
    out = [(a, h.clients[a].advertise()) for a in h.names]
    pubs = [p for a, m in out for p in srv.receive(a, m, 0.0)]
    shares = [(p.topic.split("/")[-2], M.decode(p.payload, fed=FED, kinds=M.SERVER_KINDS)) for p in pubs]
    pubs = []
    for a, peers in shares:
        msg = h.clients[a].on_peers(peers)
        if a == h.names[0]:  # one sealed share, to d01, is altered in transit
            blob = msg.shares[h.names[1]]
            msg.shares[h.names[1]] = blob[:-1] + bytes([blob[-1] ^ 0x55])
        pubs += srv.receive(a, msg, 0.0)
    routes = [(p.topic.split("/")[-2], M.decode(p.payload, fed=FED, kinds=M.SERVER_KINDS)) for p in pubs]
    pubs = []
    for a, route in routes:
        pubs += srv.receive(a, h.clients[a].on_route(route), 0.0)
    assert h.clients[h.names[1]].problems == [("bad_ciphertext", f"share from {h.names[0]}")]
    reqs = [(p.topic.split("/")[-2], M.decode(p.payload, fed=FED, kinds=M.SERVER_KINDS)) for p in pubs]
    for a, req in reqs:
        srv.receive(a, h.clients[a].on_unmask_req(req), 0.0)
    assert srv.stage == "done" and np.array_equal(srv.sum_int, sum(h.ks.values()).astype(np.uint64))


def _state(srv):
    return (srv.stage, dict(srv.keys), {k: dict(v) for k, v in srv.shares.items()}, set(srv.masked_from),
            None if srv.total is None else srv.total.copy(), set(srv.responded))


def _same(a, b):
    return all((np.array_equal(x, y) if isinstance(x, np.ndarray) or isinstance(y, np.ndarray) else x == y)
               for x, y in zip(a, b))


def test_hostile_messages_are_refused_with_a_reason_and_change_nothing():
    h = Harness(n=6, dim=50)
    srv = h.srv
    a, b = h.names[0], h.names[1]
    keys = h.clients[a].advertise()
    hostile = [
        (a, M.SAKeys(FED, 1, 0, a, keys.c_pk, keys.c_pk), "bad_key"),           # both keys the same
        (a, M.SAKeys(FED, 2, 0, a, keys.c_pk, keys.s_pk), "wrong_round"),        # keys for another round
        ("zz", M.SAKeys(FED, 1, 0, "zz", keys.c_pk, keys.s_pk), "not_selected"),
        (a, M.SAShares(FED, 1, 0, a, {}), "wrong_stage"),
        (a, M.SAMasked(FED, 1, 0, a, np.zeros(50, "<u4")), "wrong_stage"),
    ]
    for agent, msg, reason in hostile:
        before = _state(srv)
        with pytest.raises(SecAggReject) as exc:
            srv.receive(agent, msg, 0.0)
        assert exc.value.reason == reason and _same(before, _state(srv))
    # a malformed key never gets past the codec
    with pytest.raises(wire.WireError) as wexc:
        M.decode(M.encode(M.SAKeys(FED, 1, 0, a, b"short", keys.s_pk)), fed=FED, kinds=M.DEVICE_KINDS)
    assert wexc.value.reason == "bad_key"

    # run the keys and shares stages, then send hostile masked inputs and unmask messages
    pubs = [p for x in h.names for p in srv.receive(x, h.clients[x].advertise(), 0.0)]
    peers = {p.topic.split("/")[-2]: M.decode(p.payload, fed=FED, kinds=M.SERVER_KINDS) for p in pubs}
    pubs = [p for x in h.names for p in srv.receive(x, h.clients[x].on_peers(peers[x]), 0.0)]
    routes = {p.topic.split("/")[-2]: M.decode(p.payload, fed=FED, kinds=M.SERVER_KINDS) for p in pubs}
    masked = {x: h.clients[x].on_route(routes[x]) for x in h.names}
    too_big = masked[a].masked.copy()
    too_big[0] = 2 ** srv.params.bits  # out of range of the modulus
    for msg, reason in [(M.SAMasked(FED, 1, 0, a, masked[a].masked[:-1]), "bad_length"),
                        (M.SAMasked(FED, 1, 0, a, too_big), "out_of_range"),
                        (M.SAMasked(FED, 1, 1, a, masked[a].masked), "wrong_round")]:
        before = _state(srv)
        with pytest.raises(SecAggReject) as exc:
            srv.receive(a, msg, 0.0)
        assert exc.value.reason == reason and _same(before, _state(srv))
    pubs = []
    for x in h.names[:-1]:
        pubs += srv.receive(x, masked[x], 0.0)
    with pytest.raises(SecAggReject) as exc:
        srv.receive(a, masked[a], 0.0)
    assert exc.value.reason == "duplicate"
    pubs += srv.agent_offline(h.names[-1], 0.0)  # the last one dropped after sharing: its key is needed
    reqs = {p.topic.split("/")[-2]: M.decode(p.payload, fed=FED, kinds=M.SERVER_KINDS) for p in pubs}
    honest = h.clients[a].on_unmask_req(reqs[a])
    # a device sending both kinds of shares for one device
    owner = next(iter(honest.self_shares))
    both = M.SAUnmask(FED, 1, 0, a, self_shares=honest.self_shares, key_shares={owner: honest.self_shares[owner]})
    before = _state(srv)
    with pytest.raises(SecAggReject) as exc:
        srv.receive(a, both, 0.0)
    assert exc.value.reason == "both_shares" and _same(before, _state(srv))
    # and a device never hands out both: asking it for the other share of a device it revealed is refused
    with pytest.raises(SecAggError) as cexc:
        h.clients[a].on_unmask_req(M.SAUnmaskReq(FED, 1, 0, [], [owner]))
    assert cexc.value.reason in ("wrong_stage", "both_shares")
    # the rest of the round completes with the honest messages
    for x in h.names[:-1]:
        srv.receive(x, honest if x == a else h.clients[x].on_unmask_req(reqs[x]), 0.0)
    assert srv.stage == "done"
    assert np.array_equal(srv.sum_int, sum(h.ks[x] for x in h.names[:-1]).astype(np.uint64))


def test_a_device_refuses_a_request_for_both_shares_of_one_peer():
    h = Harness(n=4, dim=10)
    c = h.clients[h.names[0]]
    c.stage, c.maskers = "masked", h.names[1:]
    with pytest.raises(SecAggError) as exc:
        c.on_unmask_req(M.SAUnmaskReq(FED, 1, 0, [h.names[1]], [h.names[1]]))
    assert exc.value.reason == "both_shares" and c.stage == "masked"


def test_a_real_agent_counts_a_tampered_share_by_reason_and_still_sends_its_masked_input():
    from edge_agent.agent import AgentCore
    from edge_agent.data import LocalData
    from edge_agent.models import BuiltinModel
    from edge_agent.mqtt import Publish
    from edge_agent.spec import ModelSpec
    from edge_agent.topics import Topics

    topics, spec = Topics(FED), ModelSpec("linear", 3, 1)
    names = ["a0", "a1", "a2"]
    params = round_params("secagg", 3, 0, 0, QBITS, RANGE, 0.0)  # t = 2 of 2 peers
    X = np.ones((8, 3), np.float32)
    core = AgentCore("a0", FED, LocalData(X, np.ones(8, np.float32), X[:0], np.zeros(0, np.float32)))
    p0 = BuiltinModel(spec).init_params(0)
    model = wire.ModelMsg(FED, 0, wire.params_version(p0), spec, p0)
    core.receive(topics.model, wire.encode(model))
    out = deliver_task(core, wire.TaskMsg(FED, 1, model.version, "open", 0, 0.0, wire.TrainConfig(1, 4, 0.1),
                                          secagg=params), selection=names)
    [train] = [a for a in out if not isinstance(a, Publish) and hasattr(a, "attempt")]
    (keys_pub,) = [a for a in core.train(train.round, train.attempt) if isinstance(a, Publish)]
    keys = {"a0": M.decode(keys_pub.payload, fed=FED, kinds=M.DEVICE_KINDS)}
    others = {a: SecAggClient(FED, a, 1, 0, names, params, np.zeros(4)) for a in names[1:]}
    keys.update({a: c.advertise() for a, c in others.items()})

    def peers_of(a):
        return M.SAPeers(FED, 1, 0, {b: (keys[b].c_pk, keys[b].s_pk) for b in names if b != a})

    (shares_pub,) = core.receive(topics.inbox("a0"), M.encode(peers_of("a0")))
    sealed = {a: c.on_peers(peers_of(a)).shares["a0"] for a, c in others.items()}
    sealed["a1"] = sealed["a1"][:-1] + bytes([sealed["a1"][-1] ^ 1])  # altered in transit
    out = core.receive(topics.inbox("a0"), M.encode(M.SARoute(FED, 1, 0, sealed)))
    assert core.rejected["secagg_bad_ciphertext"] == 1
    (masked_pub,) = out
    assert M.decode(masked_pub.payload, fed=FED, kinds=M.DEVICE_KINDS).masked.shape == (4,)
    # and a hostile inbox message is dropped with a reason, changing nothing
    assert core.receive(topics.inbox("a0"), b"\x93garbage") == [] and core.rejected["secagg_not_msgpack"] == 1


# -- distributed DP inside secure aggregation (distributed discrete Gaussian) ---------------

def test_the_randomized_hadamard_rotation_keeps_norms_and_inverts():
    from edge_agent.secagg.rotation import padded_size, rotate, unrotate

    x = np.random.default_rng(1).normal(size=1000)
    y = rotate(x, bytes(range(32)))
    assert y.size == padded_size(1000) == 1024
    assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(x), rel=1e-12)
    np.testing.assert_allclose(unrotate(y, bytes(range(32)), 1000), x, atol=1e-12)
    spike = np.zeros(1000)
    spike[7] = 1.0  # the rotation spreads a spike over every coordinate
    assert np.abs(rotate(spike, bytes(32))).max() == pytest.approx(1 / 32)


def _ddg_harness(n=10, dim=2000, z=1.0, clip=1.0):
    from aggregator.secagg import ddg_params

    h = Harness(n=n, dim=dim)
    h.params = ddg_params(h.params, n, dim, clip, z)
    h.srv = make_round(FED, 1, 0, h.names, h.params, 0, dim, 100.0, 10.0)
    rng = np.random.default_rng(3)
    h.xs = {a: rng.normal(size=dim) for a in h.names}  # norm ~45: clipped to the clip norm
    h.clients = {a: SecAggClient(FED, a, 1, 0, h.names, h.params, h.xs[a]) for a in h.names}
    return h


@pytest.mark.parametrize("drop_after", [None, 2, 3])
def test_distributed_discrete_gaussian_noise_protects_each_contributor_by_z_s_from_the_others(drop_after):
    z, clip = 1.0, 1.0
    h = _ddg_harness(z=z, clip=clip)
    srv = h.run({a: drop_after for a in h.names[:3]} if drop_after else None)
    assert srv.stage == "done"
    contributors = sorted(srv.contributors)
    clipped = {a: h.xs[a] * min(1.0, clip / np.linalg.norm(h.xs[a])) for a in contributors}
    noise = srv.result - sum(clipped.values())
    c, p = len(contributors), h.params
    # the released noise is c discrete Gaussian shares of dp_sigma grid steps, in real units
    measured = float(noise.std())
    assert abs(measured / (math.sqrt(c) * p.dp_sigma * p.dp_gamma) - 1) < 5 / math.sqrt(2 * noise.size)
    # what protects one contributor is the other c - 1 shares: at least z times its sensitivity, with
    # the sensitivity measured as the largest norm of one device's rounded grid vector (in real units)
    others = measured * math.sqrt((c - 1) / c)
    assert others >= z * clip * (1 - 5 / math.sqrt(2 * noise.size))


def test_the_kls_bound_for_these_parameters_is_the_gaussian_that_is_accounted():
    """Kairouz, Liu, Steinke 2021, Thm 1: the sum of discrete Gaussians is 1/2 eps^2-concentrated DP with
    eps^2 = Delta^2 / (m sigma^2) + tau d / 2 (tau = 10 sum_k exp(-2 pi^2 sigma^2 k / (k+1))); dp-accounting's
    Gaussian mechanism of the same sigma / Delta has RDP alpha / (2 z^2): the same curve when tau is negligible."""
    from aggregator.secagg import ddg_params
    from edge_agent.secagg.rotation import padded_size

    for n, dim, z in [(10, 2000, 1.0), (100, 100_000, 0.7), (50, 650, 2.0)]:
        p = ddg_params(round_params("secagg", n, 0, 0, QBITS, RANGE, 0.0), n, dim, 1.0, z)
        d_pad = padded_size(dim)
        delta2 = 1.0 / p.dp_gamma + math.sqrt(d_pad)  # the bound on a rounded grid vector's norm
        m = p.threshold - 1  # the fewest other contributors: fewer than t masked inputs abort
        tau = 10 * sum(math.exp(-2 * math.pi ** 2 * p.dp_sigma ** 2 * k / (k + 1)) for k in range(1, m))
        eps2 = delta2 ** 2 / (m * p.dp_sigma ** 2) + tau * d_pad / 2
        assert tau == 0.0  # exp(-2 pi^2 sigma^2 k/(k+1)) with sigma ~ 1e7 grid steps underflows to 0
        acc = rdp.RdpAccountant()
        acc.compose(dpa.GaussianDpEvent(math.sqrt(m) * p.dp_sigma / delta2))
        np.testing.assert_allclose(acc.rdp, acc.orders * eps2 / 2, rtol=1e-9)
        assert eps2 == pytest.approx(1 / z ** 2, rel=1e-9)  # and it is the z the accountant charges


def test_draws_charged_under_dp_survive_a_restart_through_the_journal():
    from aggregator.config import AggregatorConfig, ModelConfig, PrivacyConfig, RoundConfig, SecAggConfig
    from aggregator.coordinator import Coordinator, Journal
    from aggregator.strategies import FedAvg
    from edge_agent.topics import Topics

    cfg = AggregatorConfig(
        federation=FED, rounds=0, model=ModelConfig(kind="linear", n_features=1, n_outputs=1),
        round=RoundConfig(min_agents=1, quorum=1, timeout=10.0),
        privacy=PrivacyConfig(mode="distributed", expected_per_round=1, population=100),
        secagg=SecAggConfig(mode="secagg"),
    )
    c = Coordinator(cfg, FedAvg())
    c.start(0.0)
    st = wire.StatusMsg(FED, 0, "a0", "online", 1, ["linear"])
    journal = [a.record for a in c.receive(Topics(FED).status("a0"), wire.encode(st), 0.0) if isinstance(a, Journal)]
    journal += [a.record for a in c.tick(1.0) if isinstance(a, Journal)]
    # one online device: every draw is too small for secure aggregation, charged and journaled
    assert c.rejected["secagg_draw_too_small"] == len(journal) == c.privacy.accountant.rounds == 2
    restarted = Coordinator(cfg, FedAvg(), journal=journal)
    restarted.start(2.0)
    assert restarted.privacy.accountant.rounds == 2


def test_a_secagg_round_cut_by_a_restart_is_charged_once_and_stays_charged():
    from aggregator.config import AggregatorConfig, ModelConfig, PrivacyConfig, RoundConfig, SecAggConfig
    from aggregator.coordinator import Coordinator, Journal
    from aggregator.strategies import FedAvg
    from edge_agent.topics import Topics

    cfg = AggregatorConfig(
        federation=FED, rounds=0, model=ModelConfig(kind="linear", n_features=1, n_outputs=1),
        round=RoundConfig(min_agents=8, quorum=1, timeout=10.0),
        privacy=PrivacyConfig(mode="distributed", expected_per_round=8, population=8),  # q = 1: all 8 drawn
        secagg=SecAggConfig(mode="secagg"),
    )
    c = Coordinator(cfg, FedAvg())
    c.start(0.0)
    journal = []
    for i in range(8):
        st = wire.StatusMsg(FED, 0, f"a{i}", "online", 1, ["linear"])
        journal += [a.record for a in c.receive(Topics(FED).status(f"a{i}"), wire.encode(st), 0.0)
                    if isinstance(a, Journal)]
    assert [r["type"] for r in journal] == ["open"] and c.secagg is not None
    first = Coordinator(cfg, FedAvg(), journal=journal)  # killed mid-protocol, restarted
    out = first.start(1.0)
    assert first.privacy.accountant.rounds == 1  # the cut attempt: drawn, so charged
    journal += [a.record for a in out if isinstance(a, Journal)]
    assert [r["type"] for r in journal][:2] == ["open", "abandon"] and journal[1]["charged"]
    second = Coordinator(cfg, FedAvg(), journal=journal[:2])  # killed again before the next close
    second.start(2.0)
    assert second.privacy.accountant.rounds == 1  # replayed once, not charged twice


def test_odd_degree_with_an_odd_number_of_devices_still_gives_a_symmetric_graph():
    names = [f"n{i}" for i in range(7)]
    g = neighbour_graph(names, 3)
    assert all(b in g[a] and a in g[b] for a in names for b in g[a])
    h = Harness(n=7, dim=50, mode="secagg+", degree=3)
    assert h.run().stage == "done"


def test_a_low_order_public_key_is_refused_by_the_aggregator():
    h = Harness(n=4, dim=10)
    keys = h.clients[h.names[0]].advertise()
    with pytest.raises(SecAggReject) as exc:
        h.srv.receive(h.names[0], M.SAKeys(FED, 1, 0, h.names[0], keys.c_pk, bytes(32)), 0.0)  # the zero point
    assert exc.value.reason == "bad_key" and h.srv.keys == {}


def test_too_many_devices_for_a_32_bit_sum_is_a_clear_error():
    with pytest.raises(ValueError, match="32"):
        round_params("secagg", 300, 0, 0, 24, 1.0, 0.0)


def test_reported_epsilon_with_secagg_matches_dp_accounting_on_the_noise_measured_inside_the_masked_sum(monkeypatch):
    """Device d00's own noise share is recorded as it is drawn; everything else in the released sum that is
    not the clipped updates is the noise protecting d00. dp-accounting's epsilon for that measured noise
    (sensitivity: the clip norm plus the grid rounding bound) must not be below what fedmqtt reports."""
    import edge_agent.secagg.client as client_mod
    from aggregator.privacy import PrivacyEngine
    from edge_agent.secagg.rotation import padded_size, unrotate
    from tests.test_privacy_guarantees import ROUNDS, config, reference_epsilon, reported_epsilon

    drawn = []
    real = client_mod.discrete_gaussian

    def recording(sigma, size, source=None):
        drawn.append(real(sigma, size, source))
        return drawn[-1]

    monkeypatch.setattr(client_mod, "discrete_gaussian", recording)
    z, clip, dim = 1.0, 1.0, 20_000
    h = _ddg_harness(n=10, dim=dim, z=z, clip=clip)
    srv = h.run()
    assert srv.stage == "done" and len(drawn) == 10  # d00 routes first: drawn[0] is its share
    p = h.params
    clipped = sum(h.xs[a] * min(1.0, clip / np.linalg.norm(h.xs[a])) for a in h.names)
    own = unrotate(drawn[0] * p.dp_gamma, bytes.fromhex(p.rotation_seed), dim)
    protecting = float((srv.result - clipped - own).std())
    sensitivity = clip + p.dp_gamma * math.sqrt(padded_size(dim))
    engine = PrivacyEngine(config(mode="distributed", noise_multiplier=z, clip=clip, expected_per_round=100,
                                  population=1000))
    reported = reported_epsilon(engine, 0.1, ROUNDS)
    reference = reference_epsilon(0.1, [protecting / sensitivity], ROUNDS)
    # 10 contributors, t = 5: d00 has 9 others where 4 would carry z S, so the truth is well below the report
    assert reported >= reference * 0.97
    # and at exactly t - 1 others (the worst case the calibration is for) the two agree
    worst = protecting * math.sqrt((p.threshold - 1) / (len(h.names) - 1))
    assert reported == pytest.approx(reference_epsilon(0.1, [worst / sensitivity], ROUNDS), rel=0.03)


# -- weighted rounds ------------------------------------------------------------------

def test_a_weighted_round_gives_the_sample_weighted_mean_and_the_exact_total_weight():
    """FedAvg weights by samples: the weight travels masked in one more coordinate, scaled updates in the rest."""
    n, dim, cap = 8, 300, 1000
    rng = np.random.default_rng(3)
    weights = {f"d{i:02d}": int(w) for i, w in enumerate(rng.integers(1, cap + 1, n))}
    h = Harness(n=n, dim=dim, max_weight=cap, weights=weights)
    h.xs = {a: rng.uniform(-0.5, 0.5, dim) for a in h.names}
    for a, c in h.clients.items():
        c.update = h.xs[a]
    srv = h.run()
    assert srv.stage == "done" and srv.dim == dim + 1
    assert int(srv.sum_int[-1]) == sum(weights.values())  # the exact total weight, as an integer
    total_w = sum(weights.values())
    weighted_mean = sum(weights[a] * h.xs[a] for a in h.names) / total_w
    # Each device's stochastic rounding moves its scaled input by under one
    # step; the mean multiplies the sum's error by max_weight / total weight.
    step = 2 * RANGE / levels(QBITS)
    np.testing.assert_allclose(srv.result / srv.weight, weighted_mean, atol=n * step * cap / total_w)
    # and it is not the unweighted mean (the weights differ enough to tell)
    assert np.abs(srv.result / srv.weight - sum(h.xs.values()) / n).max() > 10 * n * step * cap / total_w


def test_an_impossible_total_weight_aborts_the_round():
    """A device that hides a huge weight under its mask is found out by the total: nothing is released."""
    h = Harness(n=5, dim=20, max_weight=100, weights={f"d{i:02d}": 50 for i in range(5)})
    real = h.clients["d00"].on_route

    def lying(msg):
        out = real(msg)
        out.masked[-1] = (int(out.masked[-1]) + 10_000) % (1 << h.params.bits)
        return out

    h.clients["d00"].on_route = lying
    srv = h.run()
    assert srv.stage == "aborted" and "weights sum to" in srv.why and srv.result is None


def test_a_weight_outside_the_rounds_range_is_refused_by_the_device():
    h = Harness(n=4, dim=10, max_weight=100, weights={"d00": 101})
    with pytest.raises(SecAggError) as exc:
        h.run()
    assert exc.value.reason == "bad_weight"


def test_max_weight_must_fit_the_quantization_and_never_comes_with_dp():
    with pytest.raises(ValueError, match="below 2"):
        round_params("secagg", 5, 0, 0, 8, 1.0, 0.0, 256)
    task = wire.TaskMsg(FED, 1, "v", secagg=wire.SecAggParams(
        "secagg", 2, 8, 11, 1.0, max_weight=255))
    assert wire.decode(wire.encode(task), expect="task").secagg.max_weight == 255
    for bad in (dict(max_weight=256), dict(max_weight=3, dp_sigma=1.0, dp_gamma=1.0, dp_clip=1.0,
                                            rotation_seed="ab" * 32)):
        task.secagg = wire.SecAggParams("secagg", 2, 8, 11, 1.0, **bad)
        with pytest.raises(wire.WireError, match="max_weight"):
            wire.decode(wire.encode(task), expect="task")
