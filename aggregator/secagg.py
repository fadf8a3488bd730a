"""The aggregator's side of one secure-aggregation round, sans I/O.

Bonawitz et al. 2017 ("Practical Secure Aggregation for Privacy-Preserving
Machine Learning"), honest-but-curious variant, with the SecAgg+ option of
Bell et al. 2020 (each device is a peer of k neighbours on a random
k-regular graph instead of every other device). Four stages, each ending
when every device still expected has answered, or at the stage deadline:

1. ``keys``: selected devices send two X25519 public keys; each gets its
   peers' keys (``sa_peers``).
2. ``shares``: each sends its mask key and self-mask seed, Shamir-shared
   t-of-(its peers) and sealed for each peer; the aggregator routes them
   (``sa_route``).
3. ``masked``: each sends its quantized update plus its self mask and the
   pairwise masks, mod 2^bits. The aggregator only ever adds these into a
   running sum; it keeps no single device's vector.
4. ``unmask``: survivors send the self-mask shares of devices whose masked
   input arrived and the mask-key shares of devices that dropped after
   sharing (never both for one device); the aggregator recovers the seeds
   and keys, removes the masks and has the exact integer sum.

Fewer than t devices at any stage, or a device whose secrets cannot be
recovered: the round aborts and nothing is revealed.
"""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass, field

import numpy as np

from edge_agent.mqtt import Publish
from edge_agent.secagg import crypto, rotation, shamir
from edge_agent.secagg.client import context, mask_sign, pairwise_mask
from edge_agent.secagg.messages import (
    Message, SAKeys, SAMasked, SAPeers, SARoute, SAShares, SAUnmask, SAUnmaskReq, encode,
)
from edge_agent.secagg.quantize import dequantize_sum
from edge_agent.topics import Topics
from edge_agent.wire import SecAggParams, WireError

log = logging.getLogger(__name__)

# The stages a round goes through, in order; it ends "done" or "aborted".
ACTIVE_STAGES = ("keys", "shares", "masked", "unmask")


class SecAggReject(WireError):
    """A message dropped by the round, with a short ``reason`` for counters (as for any bad payload)."""


def default_threshold(peers: int) -> int:
    """t by default: a majority of a device's peers (n/2 + 1 of n)."""
    return peers // 2 + 1


def neighbour_graph(selected: list[str], degree: int) -> dict[str, set[str]]:
    """Peers of every selected device: all others (degree 0 or >= n - 1), else a random k-regular graph.

    SecAgg+ (Bell et al. 2020): a Harary graph over a random permutation: each
    device is joined to the k/2 devices before and after it on a ring (and to
    the opposite one when k is odd). The permutation comes from the OS CSPRNG
    so no one can choose their neighbours.
    """
    n = len(selected)
    if degree % 2 and n % 2:
        degree += 1  # no k-regular graph has an odd k and an odd n: one more neighbour each
    if degree <= 0 or degree >= n - 1:
        return {a: set(selected) - {a} for a in selected}
    order = [selected[i] for i in np.random.default_rng(secrets.randbits(128)).permutation(n)]
    peers: dict[str, set[str]] = {a: set() for a in selected}
    for i, a in enumerate(order):
        for step in range(1, degree // 2 + 1):
            for b in (order[(i + step) % n], order[(i - step) % n]):
                peers[a].add(b)
        if degree % 2:
            peers[a].add(order[(i + n // 2) % n])
    return peers


@dataclass
class SecAggRound:
    """Aggregator state of one attempt of a secure-aggregation round."""

    fed: str
    round: int
    attempt: int
    selected: list[str]
    params: SecAggParams
    dim: int
    deadline: float  # of the current stage
    stage_timeout: float
    peers: dict[str, set[str]]
    model_dim: int = 0  # parameters of the model (dim is padded to a power of two under DP)
    stage: str = "keys"
    why: str = ""
    keys: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # U1
    active: dict[str, set[str]] = field(default_factory=dict)  # peers each device was told of
    shares: dict[str, dict[str, bytes]] = field(default_factory=dict)  # U2: sender -> recipient -> sealed
    masked_from: set[str] = field(default_factory=set)  # U3
    unmask_asked: dict[str, tuple[set[str], set[str]]] = field(default_factory=dict)  # v -> (survivors, dropped)
    self_shares: dict[str, dict[int, bytes]] = field(default_factory=dict)  # owner -> point -> share
    key_shares: dict[str, dict[int, bytes]] = field(default_factory=dict)
    responded: set[str] = field(default_factory=set)  # U4
    offline: set[str] = field(default_factory=set)
    total: np.ndarray | None = None
    result: np.ndarray | None = None  # the float sum of the survivors' updates, once done
    weight: float = 0.0  # ... and the total weight it carries (the number of inputs, unless weighted)
    # Checks signed key advertisements (edge_agent.secagg.identity.PeerVerifier) in a provisioned federation.
    verifier: object | None = None
    proofs: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # agent -> (sig, cert) of its keys
    sum_int: np.ndarray | None = None  # the same, as the exact integer sum before dequantization

    def __post_init__(self) -> None:
        self.topics = Topics(self.fed)
        self.point = {a: i + 1 for i, a in enumerate(self.selected)}
        self.ctx = context(self.fed, self.round, self.attempt)
        self.mod = np.uint64((1 << self.params.bits) - 1)
        self.model_dim = self.model_dim or self.dim
        self._probe_key = crypto.new_keypair()[0]  # only to test advertised keys

    @property
    def contributors(self) -> set[str]:
        """Devices whose input is in the sum (valid once done)."""
        return set(self.masked_from)

    # -- events -----------------------------------------------------------------

    def receive(self, agent: str, msg: Message, now: float) -> list[Publish]:
        """A device's message; SecAggReject for anything the protocol does not allow (state unchanged)."""
        if (msg.round, msg.attempt) != (self.round, self.attempt):
            raise SecAggReject("wrong_round", f"{agent}: round {msg.round} attempt {msg.attempt}, open is "
                                              f"{self.round} attempt {self.attempt}")
        if agent not in self.point:
            raise SecAggReject("not_selected", f"{agent} is not selected")
        expected = {"keys": SAKeys, "shares": SAShares, "masked": SAMasked, "unmask": SAUnmask}.get(self.stage)
        if not isinstance(msg, expected or ()):
            raise SecAggReject("wrong_stage", f"{type(msg).__name__} from {agent} at stage {self.stage}")
        if isinstance(msg, SAKeys):
            self._on_keys(agent, msg)
        elif isinstance(msg, SAShares):
            self._on_shares(agent, msg)
        elif isinstance(msg, SAMasked):
            self._on_masked(agent, msg)
        else:
            self._on_unmask(agent, msg)
        return self._advance(now)

    def agent_offline(self, agent: str, now: float) -> list[Publish]:
        """A device's last will: stop waiting for it."""
        if agent in self.point:
            self.offline.add(agent)
        return self._advance(now)

    def tick(self, now: float) -> list[Publish]:
        return self._advance(now)

    # -- stage inputs -------------------------------------------------------------

    def _on_keys(self, agent: str, msg: SAKeys) -> None:
        if agent in self.keys:
            raise SecAggReject("duplicate", f"second key advertisement from {agent}")
        if msg.c_pk == msg.s_pk or any(msg.c_pk in k or msg.s_pk in k for k in self.keys.values()):
            raise SecAggReject("bad_key", f"{agent} reuses a public key")
        for pk in (msg.c_pk, msg.s_pk):
            try:  # a low-order point would give every peer an all-zero shared secret
                crypto.agree(self._probe_key, pk, b"fedmqtt-secagg-key-check")
            except crypto.CryptoError as exc:
                raise SecAggReject("bad_key", f"{agent}: {exc}") from None
        if self.verifier is not None:
            # Devices check each other's signatures themselves (they do not
            # trust us); checking here too drops a bad advertisement before
            # it makes every honest peer refuse the round.
            from edge_agent.secagg.client import SecAggError
            from edge_agent.secagg.identity import signed_bytes

            try:
                self.verifier.verify(agent, signed_bytes(self.fed, self.round, self.attempt, agent, msg.c_pk,
                                                         msg.s_pk), msg.sig, msg.cert)
            except SecAggError as exc:
                raise SecAggReject(exc.reason, str(exc)) from None
        self.keys[agent] = (msg.c_pk, msg.s_pk)
        if msg.sig:
            self.proofs[agent] = (msg.sig, msg.cert)

    def _on_shares(self, agent: str, msg: SAShares) -> None:
        if agent not in self.active:
            raise SecAggReject("not_expected", f"{agent} was not given peers in this round")
        if agent in self.shares:
            raise SecAggReject("duplicate", f"second shares message from {agent}")
        if set(msg.shares) != self.active[agent]:
            raise SecAggReject("bad_shares", f"{agent} must send one sealed share to each of its "
                                             f"{len(self.active[agent])} peers, sent {len(msg.shares)}")
        self.shares[agent] = dict(msg.shares)

    def _on_masked(self, agent: str, msg: SAMasked) -> None:
        if agent not in self.shares:
            raise SecAggReject("not_expected", f"{agent} shared no keys in this round")
        if agent in self.masked_from:
            raise SecAggReject("duplicate", f"second masked input from {agent}")
        if msg.masked.shape != (self.dim,):
            raise SecAggReject("bad_length", f"{agent} sent {msg.masked.shape[0]} values, the model has {self.dim}")
        if self.params.bits < 32 and int(msg.masked.max(initial=0)) > int(self.mod):
            raise SecAggReject("out_of_range", f"{agent} sent values >= 2^{self.params.bits}")
        if self.total is None:
            self.total = np.zeros(self.dim, dtype=np.uint64)
        # Only the running sum is kept: no single device's masked vector stays here.
        self.total += msg.masked
        self.total &= self.mod
        self.masked_from.add(agent)

    def _on_unmask(self, agent: str, msg: SAUnmask) -> None:
        if agent not in self.unmask_asked:
            raise SecAggReject("not_expected", f"{agent} was not asked to unmask")
        if agent in self.responded:
            raise SecAggReject("duplicate", f"second unmask message from {agent}")
        survivors, dropped = self.unmask_asked[agent]
        both = set(msg.self_shares) & set(msg.key_shares)
        if both:
            raise SecAggReject("both_shares", f"{agent} sent both shares of {sorted(both)}")
        if not set(msg.self_shares) <= survivors or not set(msg.key_shares) <= dropped:
            raise SecAggReject("bad_unmask", f"{agent} sent shares that were not asked for")
        x = self.point[agent]
        for owner, s in msg.self_shares.items():
            self.self_shares.setdefault(owner, {})[x] = s
        for owner, s in msg.key_shares.items():
            self.key_shares.setdefault(owner, {})[x] = s
        self.responded.add(agent)

    # -- stage transitions ----------------------------------------------------------

    def _waiting_for(self) -> set[str]:
        expected = {"keys": set(self.selected), "shares": set(self.active), "masked": set(self.shares),
                    "unmask": set(self.unmask_asked)}[self.stage]
        have = {"keys": set(self.keys), "shares": set(self.shares), "masked": self.masked_from,
                "unmask": self.responded}[self.stage]
        return expected - have - self.offline

    def _advance(self, now: float) -> list[Publish]:
        out: list[Publish] = []
        while self.stage in ACTIVE_STAGES and (now >= self.deadline or not self._waiting_for()):
            before = self.stage
            out += {"keys": self._close_keys, "shares": self._close_shares, "masked": self._close_masked,
                    "unmask": self._close_unmask}[self.stage]()
            if self.stage == before:  # pragma: no cover - every close moves on
                break
            self.deadline = now + self.stage_timeout
        return out

    def _abort(self, why: str) -> list[Publish]:
        self.stage, self.why = "aborted", why
        self.total = None
        log.warning("secure aggregation of round %d attempt %d aborted: %s", self.round, self.attempt, why)
        return []

    def _inbox(self, agent: str, msg: Message) -> Publish:
        return Publish(self.topics.inbox(agent), encode(msg), qos=1, retain=False)

    def _close_keys(self) -> list[Publish]:
        t = self.params.threshold
        alive = set(self.keys) - self.offline
        # A device needs t peers to hold its shares; dropping one can leave
        # another short, so prune until every remaining device has t.
        while True:
            short = {a for a in alive if len(self.peers[a] & alive) < t}
            if not short:
                break
            alive -= short
        if len(alive) < t + 1:
            return self._abort(f"{len(alive)} devices with {t} peers each after advertising keys, need {t + 1}")
        self.active = {a: self.peers[a] & alive for a in alive}
        self.stage = "shares"
        return [self._inbox(a, SAPeers(self.fed, self.round, self.attempt,
                                       {b: self.keys[b] + self.proofs.get(b, ()) for b in sorted(self.active[a])}))
                for a in sorted(alive)]

    def _close_shares(self) -> list[Publish]:
        u2 = set(self.shares)
        if len(u2) < self.params.threshold + 1:
            return self._abort(f"{len(u2)} devices shared keys, need {self.params.threshold + 1}")
        self.stage = "masked"
        return [self._inbox(v, SARoute(self.fed, self.round, self.attempt,
                                       {u: self.shares[u][v] for u in sorted(self.active[v] & u2)}))
                for v in sorted(u2 - self.offline)]

    def _close_masked(self) -> list[Publish]:
        u2, u3 = set(self.shares), set(self.masked_from)
        if len(u3) < self.params.threshold:
            return self._abort(f"{len(u3)} masked inputs, need {self.params.threshold}")
        self.stage = "unmask"
        out = []
        for v in sorted(u3 - self.offline):
            mine = self.active[v] & u2
            self.unmask_asked[v] = (mine & u3, mine - u3)
            out.append(self._inbox(v, SAUnmaskReq(self.fed, self.round, self.attempt,
                                                  sorted(mine & u3), sorted(mine - u3))))
        return out

    def _close_unmask(self) -> list[Publish]:
        p, t = self.params, self.params.threshold
        u2, u3 = set(self.shares), set(self.masked_from)
        total = self.total.copy()
        n = self.dim
        try:
            for u in sorted(u3):
                seed = shamir.combine(self.self_shares.get(u, {}), t, 32)
                total -= crypto.expand_mask(seed, n, p.bits)
            for u in sorted(u2 - u3):
                survivors = self.active[u] & u3
                if not survivors:
                    continue  # nobody masked with it: nothing to remove
                s_sk = shamir.combine(self.key_shares.get(u, {}), t, 32)
                if crypto.public_key(s_sk) != self.keys[u][1]:
                    return self._abort(f"the recovered mask key of {u} does not match its public key")
                for v in sorted(survivors):
                    mask = pairwise_mask(s_sk, self.keys[v][1], self.ctx, n, p.bits)
                    # v added sign(v, u) * mask: take it out
                    total = total - mask if mask_sign(v, u) > 0 else total + mask
        except shamir.ShamirError as exc:
            return self._abort(f"cannot recover a device's secrets: {exc}")
        except crypto.CryptoError as exc:
            return self._abort(f"cannot recompute a mask: {exc}")
        total &= self.mod
        self.sum_int = total  # the exact integer sum of the contributors' quantized inputs (mod 2^bits)
        if p.dp_sigma > 0:
            # Distributed DP: the sum of signed noised integers, lifted from
            # mod 2^bits to [-2^(bits-1), 2^(bits-1)), back to real units.
            signed = total.astype(np.int64)
            signed[signed >= 1 << (p.bits - 1)] -= 1 << p.bits
            self.result = rotation.unrotate(signed * p.dp_gamma, bytes.fromhex(p.rotation_seed), self.model_dim)
            self.weight = float(len(u3))
        elif p.max_weight > 0:
            # The last coordinate is the exact sum of the weights; each is in
            # 1..max_weight, so a sum outside that range means someone lied.
            wsum = int(total[-1])
            if not len(u3) <= wsum <= len(u3) * p.max_weight:
                return self._abort(f"the weights sum to {wsum}, impossible for {len(u3)} inputs of weight "
                                   f"1..{p.max_weight}")
            self.result = dequantize_sum(total[:-1], len(u3), p.range, p.qbits)
            self.weight = wsum / p.max_weight
        else:
            self.result = dequantize_sum(total, len(u3), p.range, p.qbits)
            self.weight = float(len(u3))
        self.total = None
        self.stage = "done"
        log.info("secure aggregation of round %d attempt %d: sum of %d inputs (%d dropped after sharing keys)",
                 self.round, self.attempt, len(u3), len(u2 - u3))
        return []


def make_round(fed: str, rnd: int, attempt: int, selected: list[str], params: SecAggParams, degree: int, dim: int,
               keys_deadline: float, stage_timeout: float, verifier: object | None = None) -> SecAggRound:
    """A new round at its first stage; ``keys_deadline`` leaves the devices time to train first.

    ``dim`` is the model's parameter count; under DP the masked vectors have
    its padded length, in a weighted round one more (the weight).
    ``verifier`` (a PeerVerifier) requires signed key advertisements.
    """
    wire_dim = rotation.padded_size(dim) if params.dp_sigma > 0 else dim + (1 if params.max_weight > 0 else 0)
    return SecAggRound(fed=fed, round=rnd, attempt=attempt, selected=sorted(selected), params=params, dim=wire_dim,
                       model_dim=dim, deadline=keys_deadline, stage_timeout=stage_timeout,
                       peers=neighbour_graph(sorted(selected), degree), verifier=verifier)


# Distributed DP: the noised sum must stay within ±2^(bits-1) per coordinate
# or it wraps around the modulus. The grid is chosen so that this many
# standard deviations of the signal-plus-noise fit: P(|N(0,1)| > 8) is about
# 1e-15 per coordinate, negligible even over millions of coordinates.
MODULAR_SAFETY_SIGMAS = 8.0
# ... and the grid must be this much finer than the clip norm times the
# rounding's norm growth sqrt(d'), or rounding would cost noticeable noise.
MIN_GRID_RATIO = 1000.0
DDG_BITS = 32  # the transport's uint32: the finest grid there is


def ddg_params(base: SecAggParams, n_selected: int, dim: int, clip: float, noise_multiplier: float) -> SecAggParams:
    """``base`` with the distributed discrete Gaussian worked out (Kairouz, Liu, Steinke 2021).

    Every contributor is protected by the noise of at least t - 1 others
    (fewer than t masked inputs abort the round), so each adds a discrete
    Gaussian share of std z·Δ/sqrt(t - 1) grid steps, where Δ = S/γ + sqrt(d')
    bounds the L2 norm of its rotated, scaled and rounded update. The grid
    step γ is the finest for which n devices' signal (rotation spreads it:
    about |x|/sqrt(d') per coordinate) plus the noise stay within
    MODULAR_SAFETY_SIGMAS of the 2^31 half-range.
    """
    t = base.threshold
    if t < 2:
        raise ValueError("distributed DP needs a secure-aggregation threshold of at least 2")
    d_pad = rotation.padded_size(dim)
    k, z, n = MODULAR_SAFETY_SIGMAS, noise_multiplier, n_selected
    root_d, share = math.sqrt(d_pad), z / math.sqrt(t - 1)
    half_range = 2.0 ** (DDG_BITS - 1)
    a = (half_range - k * math.sqrt(n) * share * root_d) / (k * (n / root_d + math.sqrt(n) * share))
    if a < MIN_GRID_RATIO * root_d:
        raise ValueError(f"{n} devices and {dim} parameters do not fit a {DDG_BITS}-bit sum with noise "
                         f"multiplier {z:g}: select fewer devices per round")
    gamma = clip / a
    sensitivity = a + root_d
    return SecAggParams(mode=base.mode, threshold=t, qbits=base.qbits, bits=DDG_BITS, range=base.range,
                        clip=base.clip, dp_sigma=share * sensitivity, dp_gamma=gamma, dp_clip=clip,
                        rotation_seed=secrets.token_hex(32))


def round_params(mode: str, n_selected: int, degree: int, threshold: float, qbits: int, value_range: float,
                 clip: float, max_weight: int = 0) -> SecAggParams:
    """The task's SecAggParams for a selection of ``n_selected``: threshold and modulus worked out.

    ``max_weight`` > 0 makes the round weighted (weights 1..max_weight, below 2^qbits).
    """
    from edge_agent.secagg.quantize import MAX_MODULUS_BITS, modulus_bits

    peers = n_selected - 1 if mode == "secagg" or degree <= 0 or degree >= n_selected - 1 else degree
    if threshold >= 1:
        t = int(threshold)
    elif threshold > 0:
        t = max(1, math.ceil(threshold * peers))
    else:
        t = default_threshold(peers)
    if not 0 <= max_weight < 1 << qbits:
        raise ValueError(f"max_weight {max_weight} must be below 2^{qbits} (it travels as one quantized coordinate)")
    bits = modulus_bits(qbits, n_selected)
    if bits > MAX_MODULUS_BITS:
        raise ValueError(f"{n_selected} devices at {qbits} quantization bits need a {bits}-bit sum; "
                         f"the masked vector carries {MAX_MODULUS_BITS}: lower [secagg] bits or select fewer")
    return SecAggParams(mode=mode, threshold=max(1, min(t, max(1, peers))), qbits=qbits,
                        bits=bits, range=value_range, clip=clip, max_weight=max_weight)
