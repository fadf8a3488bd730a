"""The device's side of one secure-aggregation round, sans I/O.

Messages in, messages out (h11 style): :meth:`SecAggClient.advertise`
starts the round, and each message from the aggregator's inbox
(:class:`~.messages.SAPeers`, :class:`~.messages.SARoute`,
:class:`~.messages.SAUnmaskReq`) returns the next message to publish.
Anything that does not fit the protocol raises :class:`SecAggError` with a
reason for the agent's counters, and changes nothing.

The secrets of the round (two X25519 private keys and the self-mask seed)
live only in this object: a device that restarts mid-round has dropped
out, which the protocol survives.
"""

from __future__ import annotations

import logging
import os

import msgpack
import numpy as np

from ..wire import SecAggParams
from ..dp import SecureRandom, discrete_gaussian
from . import crypto, rotation, shamir
from .messages import SAKeys, SAMasked, SAPeers, SARoute, SAShares, SAUnmask, SAUnmaskReq
from .quantize import quantize

log = logging.getLogger(__name__)

SEED_BYTES = 32


class SecAggError(ValueError):
    """A message the device refuses; ``reason`` is a short code for counters."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def context(fed: str, rnd: int, attempt: int) -> bytes:
    """What binds keys and ciphertexts to one attempt of one round of one federation."""
    return f"{fed}|{rnd}|{attempt}".encode()


def share_aad(ctx: bytes, sender: str, recipient: str) -> bytes:
    return ctx + f"|{sender}->{recipient}".encode()


def mask_sign(me: str, peer: str) -> int:
    """+1 if ``me`` adds the pairwise mask with ``peer``, -1 if it subtracts it (ids ordered as strings)."""
    return 1 if me < peer else -1


def pairwise_mask(s_sk: bytes, peer_s_pk: bytes, ctx: bytes, n: int, bits: int) -> np.ndarray:
    """The mask two devices share: AES-CTR of HKDF(X25519(s_sk, peer_s_pk))."""
    return crypto.expand_mask(crypto.agree(s_sk, peer_s_pk, b"fedmqtt-secagg-mask|" + ctx), n, bits)


def share_key(c_sk: bytes, peer_c_pk: bytes, ctx: bytes) -> bytes:
    return crypto.agree(c_sk, peer_c_pk, b"fedmqtt-secagg-share|" + ctx)


class SecAggClient:
    """One device in one attempt of a secure-aggregation round.

    ``selected`` is the task's selection (share points are positions in it,
    from 1); ``update`` is the device's float update flattened in spec order.
    In a provisioned federation ``identity`` signs this device's keys and
    ``verifier`` checks every peer's (:mod:`.identity`): a peer whose keys
    are unsigned or signed by anyone but that peer makes the device refuse
    the round rather than share a secret with keys the aggregator may hold.
    ``weight`` (from 1 to ``params.max_weight``) scales the update and is
    sent in one more coordinate when the round is weighted.
    """

    def __init__(self, fed: str, agent: str, rnd: int, attempt: int, selected: list[str],
                 params: SecAggParams, update: np.ndarray, *, identity=None, verifier=None,
                 weight: int = 1) -> None:
        if agent not in selected:
            raise SecAggError("not_selected", f"{agent} is not in the selection")
        self.fed, self.agent, self.round, self.attempt = fed, agent, rnd, attempt
        self.params = params
        self.ctx = context(fed, rnd, attempt)
        self.point = {a: i + 1 for i, a in enumerate(selected)}
        self.update = np.asarray(update, dtype=np.float64).ravel()
        self.c_sk, self.c_pk = crypto.new_keypair()
        self.s_sk, self.s_pk = crypto.new_keypair()
        self.b_seed = os.urandom(SEED_BYTES)
        self.stage = "keys"
        self.peers: dict[str, tuple[bytes, bytes]] = {}
        self.maskers: list[str] = []  # peers whose shares reached us: the ones we mask with
        self.held: dict[str, tuple[bytes, bytes]] = {}  # sender -> (key share, self-mask share)
        self.revealed_self: set[str] = set()
        self.revealed_key: set[str] = set()
        self.problems: list[tuple[str, str]] = []  # (reason, detail) of shares we could not open
        self.identity, self.verifier = identity, verifier
        self.weight = weight

    def _check(self, msg, stage: str) -> None:
        if (msg.fed, msg.round, msg.attempt) != (self.fed, self.round, self.attempt):
            raise SecAggError("wrong_round", f"message for round {msg.round} attempt {msg.attempt}")
        if self.stage != stage:
            raise SecAggError("wrong_stage", f"{type(msg).__name__} while at stage {self.stage}")

    def advertise(self) -> SAKeys:
        """Stage 1: the public keys (signed with the device's identity when it has one)."""
        msg = SAKeys(self.fed, self.round, self.attempt, self.agent, self.c_pk, self.s_pk)
        if self.identity is not None:
            from .identity import signed_bytes

            msg.sig = self.identity.sign(signed_bytes(self.fed, self.round, self.attempt, self.agent,
                                                      self.c_pk, self.s_pk))
            msg.cert = self.identity.cert_der
        return msg

    def on_peers(self, msg: SAPeers) -> SAShares:
        """Stage 2: split the mask key and the self-mask seed among the peers, sealed for each."""
        self._check(msg, "keys")
        peers = dict(msg.peers)
        if self.agent in peers or any(a not in self.point for a in peers):
            raise SecAggError("bad_peers", "peers must be other selected devices")
        t = self.params.threshold
        if len(peers) < t:
            raise SecAggError("too_few_peers", f"{len(peers)} peers for a threshold of {t}")
        if len({k for keys in peers.values() for k in keys[:2]}) != 2 * len(peers):
            raise SecAggError("bad_peers", "two peers (or one peer's two keys) share a public key")
        if self.verifier is not None:
            from .identity import signed_bytes

            for a, keys in sorted(peers.items()):
                sig, cert = keys[2:4] if len(keys) == 4 else (b"", b"")
                self.verifier.verify(a, signed_bytes(self.fed, self.round, self.attempt, a, keys[0], keys[1]),
                                     sig, cert)
        xs = [self.point[a] for a in sorted(peers)]
        key_shares = shamir.split(self.s_sk, xs, t)
        seed_shares = shamir.split(self.b_seed, xs, t)
        sealed = {}
        for a in sorted(peers):
            x = self.point[a]
            plain = msgpack.packb({"s": key_shares[x], "b": seed_shares[x]}, use_bin_type=True)
            try:
                key = share_key(self.c_sk, peers[a][0], self.ctx)
            except crypto.CryptoError as exc:
                raise SecAggError("bad_key", f"peer {a}: {exc}") from None
            sealed[a] = crypto.seal(key, plain, share_aad(self.ctx, self.agent, a))
        self.peers = peers
        self.stage = "shares"
        return SAShares(self.fed, self.round, self.attempt, self.agent, sealed)

    def on_route(self, msg: SARoute) -> SAMasked:
        """Stage 3: open the shares addressed to us; send the update quantized and masked."""
        self._check(msg, "shares")
        if any(a not in self.peers for a in msg.sealed):
            raise SecAggError("bad_route", "shares from devices that are not our peers")
        for sender, blob in sorted(msg.sealed.items()):
            try:
                plain = crypto.open_sealed(share_key(self.c_sk, self.peers[sender][0], self.ctx), blob,
                                           share_aad(self.ctx, sender, self.agent))
                m = msgpack.unpackb(plain, raw=False, max_bin_len=shamir.SHARE_BYTES, max_map_len=2)
                s, b = m["s"], m["b"]
                if not (isinstance(s, bytes) and isinstance(b, bytes)
                        and len(s) == len(b) == shamir.SHARE_BYTES):
                    raise ValueError("shares of the wrong size")
                self.held[sender] = (s, b)
            except crypto.CryptoError as exc:
                self.problems.append((exc.reason, f"share from {sender}"))
            except (ValueError, KeyError, TypeError, msgpack.ExtraData) as exc:
                self.problems.append(("bad_share", f"share from {sender}: {exc}"))
        # Every device whose shares were routed to us masks with us, so we
        # mask with each of them, whether or not its share opened.
        self.maskers = sorted(msg.sealed)
        p = self.params
        y = self._noised_integers() if p.dp_sigma > 0 else self._quantized()
        n = y.size
        y = y + crypto.expand_mask(self.b_seed, n, p.bits)
        for peer in self.maskers:
            try:
                mask = pairwise_mask(self.s_sk, self.peers[peer][1], self.ctx, n, p.bits)
            except crypto.CryptoError as exc:
                raise SecAggError("bad_key", f"peer {peer}: {exc}") from None
            y = y + mask if mask_sign(self.agent, peer) > 0 else y - mask
        y &= np.uint64((1 << p.bits) - 1)
        self.update = np.empty(0)  # not needed any more: keep no copy of the clear update
        self.stage = "masked"
        return SAMasked(self.fed, self.round, self.attempt, self.agent, y.astype("<u4"))

    def _quantized(self) -> np.ndarray:
        """The update clipped and quantized to [0, 2^qbits) (no DP).

        A weighted round (``max_weight`` > 0) sends (w / max_weight) times the
        clipped update, then w itself as one more, exact, coordinate: the sum
        gives the weighted sum and the total weight, nothing about one device.
        """
        p = self.params
        update = _clip(self.update, p.clip)
        if p.max_weight > 0:
            if not 1 <= self.weight <= p.max_weight:
                raise SecAggError("bad_weight", f"weight {self.weight} outside 1..{p.max_weight}")
            update = update * (self.weight / p.max_weight)
        q = quantize(update, p.range, p.qbits, np.asarray(crypto_uniform(update.size)))
        return np.append(q, np.uint64(self.weight)) if p.max_weight > 0 else q

    def _noised_integers(self) -> np.ndarray:
        """Distributed discrete Gaussian (Kairouz, Liu, Steinke 2021): this device's noised integer vector mod 2^bits.

        Clip to dp_clip, rotate, scale to the grid, round stochastically
        (each coordinate moves by less than 1, so the L2 norm grows by less
        than sqrt(d')), then add this device's discrete Gaussian share.
        """
        p = self.params
        v = rotation.rotate(_clip(self.update, p.dp_clip), bytes.fromhex(p.rotation_seed)) / p.dp_gamma
        low = np.floor(v)
        w = low.astype(np.int64) + (np.asarray(crypto_uniform(v.size)) < (v - low))
        w += discrete_gaussian(p.dp_sigma, v.size)
        return np.mod(w, 1 << p.bits).astype(np.uint64)

    def on_unmask_req(self, msg: SAUnmaskReq) -> SAUnmask:
        """Stage 4: self-mask shares of survivors, key shares of dropouts; never both for one device."""
        self._check(msg, "masked")
        survivors, dropped = set(msg.survivors), set(msg.dropped)
        if survivors & dropped:
            raise SecAggError("both_shares", f"asked for both shares of {sorted(survivors & dropped)}")
        if not (survivors | dropped) <= set(self.maskers):
            raise SecAggError("bad_unmask", "asked about devices that are not our peers in this round")
        if survivors & self.revealed_key or dropped & self.revealed_self:
            raise SecAggError("both_shares", "asked for the other share of a device already revealed")
        self.revealed_self |= survivors
        self.revealed_key |= dropped
        self.stage = "done"
        return SAUnmask(self.fed, self.round, self.attempt, self.agent,
                        self_shares={a: self.held[a][1] for a in sorted(survivors) if a in self.held},
                        key_shares={a: self.held[a][0] for a in sorted(dropped) if a in self.held})


def _clip(update: np.ndarray, norm_bound: float) -> np.ndarray:
    if norm_bound > 0:
        norm = float(np.linalg.norm(update))
        if norm > norm_bound:
            return update * (norm_bound / norm)
    return update


def crypto_uniform(n: int) -> np.ndarray:
    """U[0, 1) for the stochastic rounding, from the OS CSPRNG (as all of the device's DP randomness).

    A module-level function so that experiments can seed it (bench/experiments/exp4_privacy.py).
    """
    return SecureRandom().random(n)
