"""Aggregator configuration (``fedmqtt aggregator --config aggregator.toml``).

Loaded by the one loader in :mod:`edge_agent.config`; every key below is also
a flag (``[round] timeout`` is ``--round-timeout``). See
``deploy/aggregator.toml`` for an annotated example.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from typing import Any

from edge_agent.compression import MODES as COMPRESSION_MODES
from edge_agent.config import BrokerConfig
from edge_agent.model_api import FedModel, ModelError
from edge_agent.model_loader import load_model
from edge_agent.signing import valid_public_key
from edge_agent.spec import MODEL_KINDS, ModelSpec, spec_problems
from edge_agent.wire import valid_id

from .argtypes import parse_listen
from .strategies import BUFFERING as ROBUST_NAMES, SERVER_OPTIMIZERS as SERVER_OPTIMIZER_NAMES, STRATEGIES


@dataclass
class ModelConfig:
    """The global model's architecture and initialisation."""

    kind: str = field(default="softmax", metadata={
        "help": f"model kind: {'|'.join(MODEL_KINDS)}, or your own as 'package.module:ClassName' (or an entry-point "
                "name of group fedmqtt.models); the agents name the same"})
    n_features: int = field(default=64, metadata={"help": "input features (built-in kinds)"})
    n_outputs: int = field(default=10, metadata={"help": "classes, 1 for linear regression (built-in kinds)"})
    hidden: list[int] = field(default_factory=list, metadata={"help": "mlp hidden layer sizes"})
    seed: int = field(default=0, metadata={"help": "seed of the initial parameters"})
    options: dict = field(default_factory=dict, metadata={
        "help": "[model.options]: keyword arguments of a custom model's class (the agents use the same)"})
    _built: Any = field(default=None, init=False, repr=False, compare=False)

    def build(self) -> FedModel:
        """The model object (a custom class is imported and instantiated once)."""
        if self._built is None:
            self._built = load_model(self.kind, self.options, n_features=self.n_features, n_outputs=self.n_outputs,
                                     hidden=tuple(self.hidden))
        return self._built

    def use(self, model: FedModel) -> None:
        """Federate this model instance (the Python API): its kind and sizes replace the configured ones."""
        self.kind, self.n_features, self.n_outputs = model.kind, model.n_features, model.n_outputs
        self.hidden = list(getattr(model, "hidden", ()))
        self.options = {}
        self._built = model

    def spec(self) -> ModelSpec:
        if self.kind in MODEL_KINDS:
            return ModelSpec(self.kind, self.n_features, self.n_outputs, tuple(self.hidden))
        return self.build().spec

    def problems(self) -> list[tuple[str, str]]:
        if self.kind in MODEL_KINDS and not self.options:
            return spec_problems(self.kind, self.n_features, self.n_outputs, tuple(self.hidden))
        try:
            self.build()
        except ModelError as exc:
            return [("kind" if exc.reason == "unknown_model" else "options", exc.detail)]
        return []


@dataclass
class TrainingConfig:
    """Local training settings sent to the agents in every task."""

    epochs: int = field(default=5, metadata={"help": "local epochs per round (0: no training, protocol only)"})
    batch_size: int = field(default=32, metadata={"help": "local minibatch size"})
    lr: float = field(default=0.1, metadata={"help": "local SGD learning rate"})

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if not 0 <= self.epochs <= 10_000:
            out.append(("epochs", f"must be in 0..10000, got {self.epochs}"))
        if not 1 <= self.batch_size <= 1_000_000:
            out.append(("batch_size", f"must be in 1..1000000, got {self.batch_size}"))
        if not 0 < self.lr <= 100:
            out.append(("lr", f"must be > 0 and <= 100, got {self.lr}"))
        return out


# Largest over-selection factor accepted: Bonawitz et al. use 1.3; beyond
# 3x most of the selected devices' work would be thrown away.
MAX_OVER_SELECT = 3.0
ROUND_MODES = ("sync", "async")


@dataclass
class RoundConfig:
    """Which agents train in a round, and when a round closes (README: "Round settings")."""

    mode: str = field(default="sync", metadata={"help": "sync (rounds with deadlines) or async (FedBuff)"})
    min_agents: int = field(default=1, metadata={"help": "eligible online agents needed before a round opens"})
    agents_per_round: int = field(
        default=0, metadata={"help": "target updates per round (0: every eligible online agent)"}
    )
    fraction: float = field(
        default=0.0, metadata={"help": "target as a fraction of eligible online agents (used when agents_per_round = 0)"}
    )
    over_select: float = field(
        default=1.3, metadata={"help": "select this many times the target, to absorb dropouts"}
    )
    quorum: int = field(default=1, metadata={"help": "updates needed to close a round at its deadline"})
    timeout: float = field(default=60.0, metadata={"help": "seconds from opening a round to its deadline"})
    seed: int = field(default=0, metadata={"help": "seed of the agent selection"})

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.mode not in ROUND_MODES:
            out.append(("mode", f"must be one of {', '.join(ROUND_MODES)}, got {self.mode!r}"))
        if self.min_agents < 1:
            out.append(("min_agents", f"must be >= 1, got {self.min_agents}"))
        if self.agents_per_round < 0:
            out.append(("agents_per_round", f"must be >= 0, got {self.agents_per_round}"))
        if not 0.0 <= self.fraction <= 1.0:
            out.append(("fraction", f"must be in [0, 1], got {self.fraction}"))
        if self.agents_per_round and self.fraction:
            out.append(("fraction", "set agents_per_round or fraction, not both"))
        if not 1.0 <= self.over_select <= MAX_OVER_SELECT:
            out.append(("over_select", f"must be in [1, {MAX_OVER_SELECT}], got {self.over_select}"))
        if self.quorum < 1:
            out.append(("quorum", f"must be >= 1, got {self.quorum}"))
        if self.agents_per_round and self.quorum > self.agents_per_round:
            out.append(("quorum", f"{self.quorum} can never be met with agents_per_round = {self.agents_per_round}"))
        if not 0.1 <= self.timeout <= 7 * 24 * 3600:
            out.append(("timeout", f"must be between 0.1 s and a week, got {self.timeout}"))
        return out


@dataclass
class FedBuffConfig:
    """Asynchronous mode (FedBuff, Nguyen et al. 2022), used when ``[round] mode = "async"``."""

    buffer: int = field(default=10, metadata={"help": "apply the buffered updates every K accepted updates"})
    staleness_exponent: float = field(
        default=0.5, metadata={"help": "update weight x (1 + staleness)^-p (FedBuff's polynomial p)"}
    )
    max_staleness: int = field(default=10, metadata={"help": "reject updates trained on a model this many versions old"})

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.buffer < 1:
            out.append(("buffer", f"must be >= 1, got {self.buffer}"))
        if not 0.0 <= self.staleness_exponent <= 10.0:
            out.append(("staleness_exponent", f"must be in [0, 10], got {self.staleness_exponent}"))
        if not 0 <= self.max_staleness <= 1000:
            out.append(("max_staleness", f"must be in 0..1000, got {self.max_staleness}"))
        return out


@dataclass
class StrategyConfig:
    """The aggregation rule and its hyperparameters (docs/strategies.md).

    Every key is range-checked whatever the rule; a rule reads only its own
    keys (the table in docs/strategies.md says which).
    """

    name: str = field(default="fedavg", metadata={"help": f"aggregation rule: {'|'.join(STRATEGIES)}"})
    prox_mu: float = field(default=0.0, metadata={"help": "FedProx proximal term mu sent to the agents (0: off; > 0 for fedprox)"})
    server_lr: float = field(default=0.0, metadata={"help": "server learning rate eta of fedavgm|fedadam|fedyogi|fedadagrad "
                                                            "(0: rule default, 1.0 for fedavgm, 0.1 for the adaptive rules)"})
    momentum: float = field(default=0.9, metadata={"help": "fedavgm server momentum beta (Hsu et al. 2019)"})
    beta1: float = field(default=0.9, metadata={"help": "fedadam|fedyogi|fedadagrad first-moment decay (Reddi et al. 2021)"})
    beta2: float = field(default=0.99, metadata={"help": "fedadam|fedyogi second-moment decay (Reddi et al. 2021)"})
    tau: float = field(default=1e-3, metadata={"help": "adaptive rules' epsilon tau; v starts at tau^2"})
    trim_beta: float = field(default=0.1, metadata={"help": "trimmed_mean: fraction trimmed per side, 0 <= beta < 0.5"})
    byzantine_f: int = field(default=1, metadata={"help": "krum|multi_krum: Byzantine updates tolerated (needs n > 2f + 2)"})
    multi_krum_m: int = field(default=0, metadata={"help": "multi_krum: lowest-score updates averaged (0: n - f)"})
    clip_norm: float = field(default=0.0, metadata={"help": "L2 bound on every whole delta before any rule (0: off)"})
    # Rules that keep every update (median, trimmed_mean, krum, multi_krum)
    # hold n x d float32 and Krum's distances cost O(n^2 d): 1000 updates of
    # a 100k-parameter model are 400 MB, about what one aggregator host
    # should spend. Bigger fleets select a sample per round (agents_per_round).
    max_updates: int = field(default=1000, metadata={"help": "updates a buffering rule keeps per round; "
                                                             "more are rejected as round_full"})

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.name not in STRATEGIES:
            out.append(("name", f"must be one of {', '.join(STRATEGIES)}, got {self.name!r}"))
        if not 0.0 <= self.prox_mu <= 1e6:
            out.append(("prox_mu", f"must be >= 0, got {self.prox_mu}"))
        elif self.name == "fedprox" and self.prox_mu == 0.0:
            out.append(("prox_mu", "must be > 0 for fedprox (with prox_mu = 0 it is plain fedavg)"))
        if not 0.0 <= self.server_lr <= 1e3:
            out.append(("server_lr", f"must be > 0 and <= 1000, or 0 for the rule default, got {self.server_lr}"))
        if not 0.0 <= self.momentum < 1.0:
            out.append(("momentum", f"must be in [0, 1), got {self.momentum}"))
        if not 0.0 <= self.beta1 < 1.0:
            out.append(("beta1", f"must be in [0, 1), got {self.beta1}"))
        if not 0.0 <= self.beta2 < 1.0:
            out.append(("beta2", f"must be in [0, 1), got {self.beta2}"))
        if not 0.0 < self.tau <= 10.0:
            out.append(("tau", f"must be > 0 and <= 10, got {self.tau}"))
        if not 0.0 <= self.trim_beta < 0.5:
            out.append(("trim_beta", f"must be in [0, 0.5), got {self.trim_beta}"))
        if not 1 <= self.max_updates <= 1_000_000:
            out.append(("max_updates", f"must be in 1..1000000, got {self.max_updates}"))
        if self.byzantine_f < 0:
            out.append(("byzantine_f", f"must be >= 0, got {self.byzantine_f}"))
        elif self.name in ("krum", "multi_krum") and self.max_updates <= 2 * self.byzantine_f + 2:
            out.append(("byzantine_f", f"krum needs more than 2f + 2 = {2 * self.byzantine_f + 2} updates, "
                                       f"max_updates = {self.max_updates} never allows it"))
        if self.multi_krum_m < 0:
            out.append(("multi_krum_m", f"must be >= 0 (0: n - f), got {self.multi_krum_m}"))
        elif self.name == "multi_krum" and self.multi_krum_m > self.max_updates - self.byzantine_f:
            out.append(("multi_krum_m", f"must be <= max_updates - byzantine_f = "
                                        f"{self.max_updates - self.byzantine_f}, got {self.multi_krum_m}"))
        if not (0.0 <= self.clip_norm and math.isfinite(self.clip_norm)):
            out.append(("clip_norm", f"must be a finite number >= 0 (0: off), got {self.clip_norm}"))
        return out


@dataclass
class SecurityConfig:
    """Defences of the aggregator (deploy/README.md "Security")."""

    signing_key: str = field(
        default="", metadata={"help": "Ed25519 private key (PKCS#8 PEM) that signs model, model/onnx and task"}
    )
    announce_keys: list[str] = field(
        default_factory=list,
        metadata={"help": "further public keys (64 hex digits) to announce, signed, on fl/<fed>/keys: "
                          "the next signing key, so agents trust it before the switch"},
    )
    max_update_norm: float = field(
        default=0.0, metadata={"help": "reject updates whose L2 norm exceeds this (0: off; [strategy] clip_norm clips instead)"}
    )
    # An honest agent sends about one update and at most one status per
    # round; 20/s leaves room for rounds of 50 ms while a flood of 1000/s is
    # cut to 2%. A dropped update is not sent again, so keep this well above
    # the fleet's real round rate (the demo's trusted simulation turns it off).
    rate_limit: float = field(
        default=20.0, metadata={"help": "messages per second one agent may send on average (0: no limit)"}
    )
    rate_burst: int = field(default=100, metadata={"help": "messages one agent may send at once before the rate applies"})
    # Agent identity rests on the broker's ACL (docs/PROTOCOL.md §1.5): at
    # start the aggregator tries an anonymous publish under update/ and warns
    # when the broker takes it.
    probe_open_broker: bool = field(
        default=True,
        metadata={"help": "at start, warn when the broker lets an anonymous client publish to fl/<fed>/update/+ "
                          "(tried with a second, anonymous connection and an ignored probe topic)"},
    )

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.signing_key and not Path(self.signing_key).is_file():
            out.append(("signing_key", f"no such file: {self.signing_key}"))
        bad = [k for k in self.announce_keys if not valid_public_key(k)]
        if bad:
            out.append(("announce_keys", f"must be raw Ed25519 public keys as 64 hex digits, got {bad}"))
        if self.announce_keys and not self.signing_key:
            out.append(("announce_keys", "announcing keys needs a signing_key to sign the announcement"))
        if self.max_update_norm < 0:
            out.append(("max_update_norm", f"must be >= 0, got {self.max_update_norm}"))
        if self.rate_limit < 0:
            out.append(("rate_limit", f"must be >= 0, got {self.rate_limit}"))
        if self.rate_burst < 1:
            out.append(("rate_burst", f"must be >= 1, got {self.rate_burst}"))
        return out


SECAGG_MODES = ("off", "secagg", "secagg+")
SECAGG_WEIGHTINGS = ("auto", "samples", "uniform")
# Rules that need only the sum of the updates (the weighted mean and the
# server optimizers built on it); the robust rules look at single updates,
# which secure aggregation hides.
SECAGG_STRATEGIES = ("fedavg", "fedavg_unweighted", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
# The masked sum travels as uint32: quantization bits plus log2(devices) must fit.
MAX_SECAGG_BITS = 32


@dataclass
class SecAggConfig:
    """Secure aggregation (README "Secure aggregation"; Bonawitz et al. 2017, Bell et al. 2020)."""

    mode: str = field(default="off", metadata={"help": "off | secagg (every pair of devices) | secagg+ (k neighbours)"})
    threshold: float = field(
        default=0.0,
        metadata={"help": "t: shares that recover one device's secrets; >= 1 absolute, < 1 a fraction of its "
                          "peers, 0: a majority of its peers (n/2 + 1)"},
    )
    degree: int = field(default=0, metadata={"help": "secagg+: peers per device k (0: 2 ceil(log2 n), at least 4)"})
    bits: int = field(default=16, metadata={"help": "quantization bits per coordinate"})
    range: float = field(default=1.0, metadata={"help": "coordinates are clamped to [-range, range] before quantization"})
    clip: float = field(default=0.0, metadata={"help": "clip each update to this L2 norm first (0: no clipping)"})
    stage_timeout: float = field(default=30.0, metadata={"help": "seconds each protocol stage after the first waits"})
    weighting: str = field(
        default="auto",
        metadata={"help": "samples: weigh updates by sample count as FedAvg does (the weight travels masked too) | "
                          "uniform: every update counts once | auto: samples, uniform under DP"},
    )
    max_weight: int = field(
        default=0,
        metadata={"help": "samples weighting: sample counts are capped here (0: the largest count the selected "
                          "devices report, at most 2^bits - 1)"},
    )
    signed_keys: bool = field(
        default=True,
        metadata={"help": "when the aggregator has a client certificate and CA (a provisioned federation), accept "
                          "only key advertisements signed with the device's certificate"},
    )

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.mode not in SECAGG_MODES:
            out.append(("mode", f"must be one of {', '.join(SECAGG_MODES)}, got {self.mode!r}"))
        if self.threshold < 0 or (1 <= self.threshold < 2):
            # t = 1 would let any single peer (or the aggregator with one share) recover a device's secrets
            out.append(("threshold", f"must be 0 (default), a fraction in (0, 1), or >= 2, got {self.threshold}"))
        if self.degree < 0:
            out.append(("degree", f"must be >= 0, got {self.degree}"))
        if not 1 <= self.bits <= 24:
            out.append(("bits", f"must be in 1..24 (the sum of many must fit {MAX_SECAGG_BITS} bits), got {self.bits}"))
        if not self.range > 0:
            out.append(("range", f"must be > 0, got {self.range}"))
        if self.clip < 0:
            out.append(("clip", f"must be >= 0, got {self.clip}"))
        if not self.stage_timeout > 0:
            out.append(("stage_timeout", f"must be > 0, got {self.stage_timeout}"))
        if self.weighting not in SECAGG_WEIGHTINGS:
            out.append(("weighting", f"must be one of {', '.join(SECAGG_WEIGHTINGS)}, got {self.weighting!r}"))
        if not 0 <= self.max_weight < 1 << min(self.bits, 24):
            out.append(("max_weight", f"must be in 0..2^bits - 1 (the weight is one quantized coordinate), "
                                      f"got {self.max_weight}"))
        return out


# A draw too small to aggregate securely releases nothing, which tells the
# draw was small: its probability must be a small share of delta.
SMALL_DRAW_DELTA_SHARE = 10.0


def _secagg_small_draw_probability(cfg: "AggregatorConfig") -> float | None:
    """P(a Poisson draw selects fewer devices than secure aggregation needs), or None without a population.

    Worst case: the draw is made from the fewest candidates a round opens
    with, ``[round] min_agents``.
    """
    p = cfg.privacy
    if not p.population:
        return None
    expected = p.expected_per_round or cfg.round.agents_per_round
    q = min(1.0, expected / p.population)
    n = cfg.round.min_agents
    need = 3 if cfg.secagg.threshold < 1 else int(cfg.secagg.threshold) + 1
    return sum(math.comb(n, k) * q ** k * (1 - q) ** (n - k) for k in range(min(need, n + 1)))


PRIVACY_MODES = ("off", "central", "local", "distributed")
# Andrew et al. 2021 suggest a count noise of σ_b = (expected devices) / 20.
COUNT_STDDEV_DIVISOR = 20.0
PLD_MIN_NOISE = 0.3


@dataclass
class PrivacyConfig:
    """Client-level differential privacy (README "Privacy"; McMahan et al. 2018, Andrew et al. 2021)."""

    mode: str = field(default="off", metadata={"help": "off | central | local | distributed: who adds the noise"})
    clip: float = field(default=1.0, metadata={"help": "L2 clip norm S of every update (the initial one with adaptive_clip)"})
    noise_multiplier: float = field(default=1.0, metadata={"help": "z: noise std is z x S on the sum of updates"})
    target_epsilon: float = field(
        default=0.0,
        metadata={"help": "> 0: choose z so that `rounds` rounds spend this epsilon, and stop there "
                          "(needs population and rounds > 0)"},
    )
    delta: float = field(default=1e-5, metadata={"help": "the delta of (epsilon, delta)"})
    budget: float = field(
        default=0.0, metadata={"help": "never start a round that would take epsilon above this (0: target_epsilon, or no cap)"}
    )
    accountant: str = field(default="rdp", metadata={"help": "rdp | pld (dp-accounting)"})
    population: int = field(
        default=0, metadata={"help": "devices in the population (0: every agent the aggregator has seen)"}
    )
    expected_per_round: int = field(
        default=0, metadata={"help": "expected devices per round, q = this / population (0: [round] agents_per_round)"}
    )
    min_clients: int = field(
        default=2,
        metadata={"help": "distributed: each device adds noise z S / sqrt(min_clients - 1), so any min_clients "
                          "updates protect each one by z S from the others' noise (>= 2)"},
    )
    adaptive_clip: bool = field(default=False, metadata={"help": "adapt S towards the target quantile of update norms"})
    target_quantile: float = field(default=0.5, metadata={"help": "adaptive clipping: share of updates left unclipped"})
    clip_lr: float = field(default=0.2, metadata={"help": "adaptive clipping: geometric learning rate eta_C"})
    count_stddev: float = field(
        default=0.0, metadata={"help": "adaptive clipping: noise on the unclipped count (0: expected_per_round / 20)"}
    )

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.mode not in PRIVACY_MODES:
            out.append(("mode", f"must be one of {', '.join(PRIVACY_MODES)}, got {self.mode!r}"))
        if not self.clip > 0:
            out.append(("clip", f"must be > 0, got {self.clip}"))
        if not 0 < self.noise_multiplier <= 1000:
            out.append(("noise_multiplier", f"must be in (0, 1000], got {self.noise_multiplier}"))
        if self.target_epsilon < 0 or self.budget < 0:
            out.append(("target_epsilon" if self.target_epsilon < 0 else "budget", "must be >= 0"))
        if not 0 < self.delta < 1:
            out.append(("delta", f"must be in (0, 1), got {self.delta}"))
        if self.accountant not in ("rdp", "pld"):
            out.append(("accountant", f"must be rdp or pld, got {self.accountant!r}"))
        elif self.accountant == "pld" and self.noise_multiplier < PLD_MIN_NOISE:
            # dp-accounting's PLD takes seconds to minutes per round below this
            # (measured: 19 s at z = 0.05, over 6 minutes at 0.01), on the event loop.
            out.append(("accountant", f"pld needs noise_multiplier >= {PLD_MIN_NOISE}; use rdp for z = {self.noise_multiplier}"))
        if self.population < 0 or self.expected_per_round < 0:
            out.append(("population" if self.population < 0 else "expected_per_round", "must be >= 0"))
        if self.population and self.expected_per_round > self.population:
            out.append(("expected_per_round", f"{self.expected_per_round} is more than the population {self.population}"))
        if self.target_epsilon and not self.population:
            out.append(("population", "target_epsilon needs the population size to plan the noise"))
        if self.min_clients < 2:
            # a device's own share does not protect it: one device needs at least one other share
            out.append(("min_clients", f"must be >= 2, got {self.min_clients}"))
        if not 0 < self.target_quantile < 1:
            out.append(("target_quantile", f"must be in (0, 1), got {self.target_quantile}"))
        if not 0 < self.clip_lr <= 10:
            out.append(("clip_lr", f"must be in (0, 10], got {self.clip_lr}"))
        if self.count_stddev < 0:
            out.append(("count_stddev", f"must be >= 0, got {self.count_stddev}"))
        return out


# Top-k keeps a tenth of each tensor by default: with 8 bytes per kept value
# (uint32 index + float32 value) an update shrinks about fivefold, and error
# feedback carries the rest into later rounds (docs/performance.md,
# "Update compression", has the accuracy it costs).
DEFAULT_TOPK_FRACTION = 0.1


@dataclass
class CompressionConfig:
    """Update compression on the agents (README "Update compression"; docs/PROTOCOL.md §3.3.1)."""

    mode: str = field(default="none", metadata={
        "help": "none | q8 (8-bit stochastic quantization, about 4x smaller) | topk (the largest topk_fraction "
                "of each tensor); both with error feedback on the agents"})
    topk_fraction: float = field(default=DEFAULT_TOPK_FRACTION, metadata={
        "help": "topk: fraction of each tensor's elements sent, by magnitude, in (0, 1]"})

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.mode not in COMPRESSION_MODES:
            out.append(("mode", f"must be one of {', '.join(COMPRESSION_MODES)}, got {self.mode!r}"))
        if not (math.isfinite(self.topk_fraction) and 0.0 < self.topk_fraction <= 1.0):
            out.append(("topk_fraction", f"must be in (0, 1], got {self.topk_fraction}"))
        return out


@dataclass
class OnnxConfig:
    """ONNX export of the global model (needs the ``aggregator`` extra: onnx)."""

    every: int = field(default=1, metadata={"help": "export every N closed rounds (0: never)"})
    keep: int = field(default=0, metadata={"help": "model-r<round>.onnx files kept in state_dir (0: all)"})
    class_labels: list[str] = field(default_factory=list, metadata={"help": "class names for the metadata (default 0..n-1)"})

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.every < 0:
            out.append(("every", f"must be >= 0, got {self.every}"))
        if self.keep < 0:
            out.append(("keep", f"must be >= 0, got {self.keep}"))
        return out


@dataclass
class MetricsConfig:
    """Monitoring: a Prometheus/OpenMetrics endpoint (README "Watching a federation")."""

    listen: str = field(default="", metadata={
        "help": "HOST:PORT to serve Prometheus metrics on at /metrics, e.g. 127.0.0.1:9108 (needs prometheus-client, "
                "in the aggregator extra; empty: off). Operators only: keep it on loopback or a private network"})

    def problems(self) -> list[tuple[str, str]]:
        if not self.listen:
            return []
        try:
            parse_listen(self.listen)
        except ValueError as exc:
            return [("listen", str(exc))]
        return []


# Where a site aggregator's agents-facing broker holds the cloud federation's
# topics (mapped there by the site broker's mosquitto bridge): cloud/fl/<fed>/...
DEFAULT_UPSTREAM_PREFIX = "cloud"
# Seconds a site's local round ends before the cloud's deadline: the mean still
# has to cross the bridge (and wait out a short cloud outage in its queue).
DEFAULT_UPLOAD_MARGIN_S = 5.0
MAX_UPLOAD_MARGIN_S = 3600.0
ROLES = ("flat", "site", "cloud")


def _password_file_problems(section: str, username: str, password_file: str) -> list[tuple[str, str]]:
    """The checks of a section's second login (``[site]``, ``[workers]``): its password file needs its user name."""
    out = []
    if password_file and not username:
        out.append(("password_file", f"is the password of [{section}] username: set username too"))
    if password_file and not Path(password_file).is_file():
        out.append(("password_file", f"no such file: {password_file}"))
    return out


@dataclass
class SiteConfig:
    """The site role (``role = "site"``, deploy/scale.md "Site hierarchy", docs/PROTOCOL.md §9).

    A site aggregator talks only to its own (site) broker; the broker's
    mosquitto bridge carries the ``upstream_prefix`` topics to and from the
    cloud broker, so there is no upstream broker address here.
    """

    id: str = field(default="", metadata={
        "help": "this site's participant id at the cloud (an agent id, e.g. site-a; none of the site's agents "
                "may use it); required with role = site"})
    upstream_prefix: str = field(default=DEFAULT_UPSTREAM_PREFIX, metadata={
        "help": "the site broker's bridge maps the cloud's fl/<federation>/... to <upstream_prefix>/fl/<federation>/..."})
    upload_margin: float = field(default=DEFAULT_UPLOAD_MARGIN_S, metadata={
        "help": "seconds a local round ends before the cloud round's deadline, for the upload through the bridge"})
    # The site aggregator holds two connections to the site broker (its local
    # service, and the site as an agent of the cloud). A broker with
    # use_username_as_clientid (deploy/mosquitto/) gives one login one client
    # id, so the two need two logins: the upstream one is this.
    username: str = field(default="", metadata={
        "help": "site broker login of the site's upstream connection (the bridged cloud topics; empty: [broker] "
                "username); needed when the broker sets use_username_as_clientid"})
    password_file: str = field(default="", metadata={
        "help": "its password, read from this file (empty: [broker]'s password, with username empty too)"})

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.id and not valid_id(self.id):
            out.append(("id", f"must match [A-Za-z0-9_-]{{1,64}} (it is an agent id at the cloud), got {self.id!r}"))
        if not self.upstream_prefix or not all(valid_id(p) for p in self.upstream_prefix.split("/")):
            out.append(("upstream_prefix", "must be one or more '/'-separated [A-Za-z0-9_-] segments, got "
                                           f"{self.upstream_prefix!r}"))
        out += _password_file_problems("site", self.username, self.password_file)
        if not 0.0 <= self.upload_margin <= MAX_UPLOAD_MARGIN_S:
            out.append(("upload_margin", f"must be in [0, {MAX_UPLOAD_MARGIN_S:g}] seconds, got {self.upload_margin}"))
        return out


# Ingest workers (deploy/scale.md "Ingest workers", docs/PROTOCOL.md §10).
DEFAULT_WORKER_GROUP = "fedmqtt-ingest"
# How long the coordinator waits for a worker's partial once it asked for it
# (a worker being restarted replays its journal within a second or two).
DEFAULT_COLLECT_TIMEOUT_S = 5.0
MAX_COLLECT_TIMEOUT_S = 600.0
# How long the broker keeps a stopped worker's session: its share of the
# updates queues there meanwhile and is delivered when it comes back; a worker
# gone for longer loses its subscription, and the others take every update.
DEFAULT_WORKER_SESSION_EXPIRY_S = 300


@dataclass
class WorkersConfig:
    """Ingest workers: N processes split the update stream with an MQTT 5 shared subscription."""

    count: int = field(default=0, metadata={
        "help": "ingest worker processes that decode, check, journal and sum the updates (0: the aggregator "
                "reads them itself); deploy/scale.md \"Ingest workers\""})
    spawn: bool = field(default=True, metadata={
        "help": "the aggregator starts the workers on this machine and restarts any that dies (false: run "
                "`fedmqtt worker --index I` yourself, e.g. on other machines)"})
    group: str = field(default=DEFAULT_WORKER_GROUP, metadata={
        "help": "shared subscription group ($share/<group>/fl/<federation>/update/+)"})
    collect_timeout: float = field(default=DEFAULT_COLLECT_TIMEOUT_S, metadata={
        "help": "seconds the coordinator waits for a worker's partial sum when a round closes; after it the "
                "worker's updates count as dropouts"})
    session_expiry: int = field(default=DEFAULT_WORKER_SESSION_EXPIRY_S, metadata={
        "help": "seconds the broker keeps a stopped worker's session and queues its share of the updates"})
    state_dir: str = field(default="", metadata={
        "help": "where the workers keep their journals, each in <this>/worker-<index> (empty: [state_dir])"})
    # A broker with use_username_as_clientid gives one login one client id:
    # workers sharing the aggregator's login would take over its session.
    username: str = field(default="", metadata={
        "help": "worker I logs in as <username>-I (empty: [broker] username); needed where the broker sets "
                "use_username_as_clientid"})
    password_file: str = field(default="", metadata={
        "help": "the workers' password, read from this file (empty: [broker]'s password, with username empty too)"})

    def problems(self) -> list[tuple[str, str]]:
        from .ingest.wire import MAX_WORKERS

        out = []
        if not 0 <= self.count <= MAX_WORKERS:
            out.append(("count", f"must be in 0..{MAX_WORKERS}, got {self.count}"))
        if not valid_id(self.group):
            out.append(("group", f"must match [A-Za-z0-9_-]{{1,64}}, got {self.group!r}"))
        if not 0.1 <= self.collect_timeout <= MAX_COLLECT_TIMEOUT_S:
            out.append(("collect_timeout", f"must be in [0.1, {MAX_COLLECT_TIMEOUT_S:g}] seconds, "
                                           f"got {self.collect_timeout}"))
        if not 0 <= self.session_expiry <= 0xFFFFFFFF:
            out.append(("session_expiry", f"must be in 0..4294967295 seconds, got {self.session_expiry}"))
        if self.username and not valid_id(self.username):
            out.append(("username", f"must match [A-Za-z0-9_-]{{1,64}} (worker I logs in as <username>-I), "
                                    f"got {self.username!r}"))
        if self.username and not self.password_file:
            out.append(("username", "the workers' logins need their password: set [workers] password_file too"))
        return out + _password_file_problems("workers", self.username, self.password_file)


def _workers_problems(cfg: "AggregatorConfig") -> list[tuple[str, str]]:
    """What ingest workers cannot do (deploy/scale.md "Ingest workers" says why)."""
    if not cfg.workers.count:
        return []
    from .broker_tier import shared_subscription_problem

    out: list[tuple[str, str]] = []
    problem = shared_subscription_problem(cfg.broker)
    if problem:
        out.append(("broker.protocol", problem))
    if cfg.strategy.name in ROBUST_NAMES:
        out.append(("strategy.name", f"{cfg.strategy.name!r} needs every update in one place; each worker sends "
                    "one weighted mean of its share, so the rule must be a weighted mean (FedAvg, its server "
                    "optimizers); run robust rules without workers"))
    if cfg.privacy.enabled:
        out.append(("privacy.mode", "differential privacy is not available with ingest workers (the accountant's "
                    "per-round clip and noise run in one process); set [workers] count = 0"))
    if cfg.secagg.enabled:
        out.append(("secagg.mode", "secure aggregation needs the whole masked sum in one process; set [workers] "
                    "count = 0"))
    if cfg.round.mode != "sync":
        out.append(("round.mode", "ingest workers serve synchronous rounds; set mode = \"sync\""))
    if cfg.role == "site":
        out.append(("role", "a site aggregator reads its own site's updates; ingest workers are for a flat or "
                    "cloud aggregator"))
    return out


def _hierarchy_problems(cfg: "AggregatorConfig") -> list[tuple[str, str]]:
    """What a site or cloud role cannot do (deploy/scale.md "Site hierarchy" says why)."""
    out: list[tuple[str, str]] = []
    if cfg.role not in ROLES:
        return [("role", f"must be one of {', '.join(ROLES)}, got {cfg.role!r}")]
    if cfg.role == "flat":
        return out
    level = "a site" if cfg.role == "site" else "the cloud"
    if cfg.privacy.enabled:
        out.append(("privacy.mode", f"differential privacy is not available in a site hierarchy ({level}): at the "
                    "cloud the sampled and clipped participants are sites, so the guarantee would be per site, not "
                    "per device, and a site's own DP would not compose into a cloud-level guarantee this project "
                    "can state; set mode = off (or run a flat federation)"))
    if cfg.secagg.enabled:
        why = ("the cloud's participants are sites: a site's mean is not a device's update, and masking it hides "
               "nothing the site aggregator did not see" if cfg.role == "cloud" else
               "a site would have to forward the weight carried inside the masked sum and fit the protocol's "
               "stages into the cloud's deadline; not implemented")
        out.append(("secagg.mode", f"secure aggregation is not available in a site hierarchy ({level}): {why}; "
                    "set mode = off"))
    if cfg.round.mode != "sync":
        out.append(("round.mode", f"a site hierarchy runs synchronous rounds ({level}); set mode = \"sync\""))
    if cfg.role == "site":
        s = cfg.strategy.name
        if s != "fedavg":
            if s in SERVER_OPTIMIZER_NAMES:
                why = "a server optimizer must run once, at the cloud; a site sends the plain weighted mean"
            elif s in ROBUST_NAMES:
                why = ("a robust rule needs every device's update, and a site sends one mean: it cannot be computed "
                       "hierarchically (configure it at the cloud to make it robust against whole sites)")
            elif s == "fedavg_unweighted":
                why = "a site's unweighted mean, averaged again at the cloud, is not the unweighted mean over devices"
            else:
                why = "the cloud's prox_mu reaches the site's agents in every task; the site aggregates as fedavg"
            out.append(("strategy.name", f"must be fedavg at a site, got {s!r}: {why}"))
        if not cfg.site.id:
            out.append(("site.id", "a site needs its participant id at the cloud (e.g. site-a)"))
        if cfg.compression.enabled:
            out.append(("compression.mode", "a site takes update compression from the cloud's task; leave it none"))
    else:
        if cfg.strategy.clip_norm:
            out.append(("strategy.clip_norm", "at the cloud it would clip each site's mean, not device updates: "
                        "set clip_norm in the sites' configs (it clips each device's delta there, as flat would)"))
    return out


@dataclass
class AggregatorConfig:
    """Everything the aggregator service needs."""

    federation: str = field(default="demo", metadata={"help": "federation id ([A-Za-z0-9_-]{1,64})"})
    role: str = field(default="flat", metadata={
        "help": "flat (one aggregator) | site (a site aggregator below a cloud, see [site]) | cloud (its "
                "participants are sites): deploy/scale.md \"Site hierarchy\""})
    rounds: int = field(default=20, metadata={"help": "rounds to run (0: run until stopped)"})
    state_dir: str = field(default="fedmqtt-state", metadata={"help": "checkpoint directory"})
    test_data: str = field(default="", metadata={"help": "optional central test set (.npz or .csv)"})
    label_column: str = field(default="label", metadata={"help": "label column of a .csv test set"})
    session_expiry: int = field(
        default=86400,
        metadata={"help": "seconds the broker keeps the aggregator's session (and updates sent to it) while it is down"},
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    round: RoundConfig = field(default_factory=RoundConfig)
    fedbuff: FedBuffConfig = field(default_factory=FedBuffConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    onnx: OnnxConfig = field(default_factory=OnnxConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    site: SiteConfig = field(default_factory=SiteConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if not valid_id(self.federation):
            out.append(("federation", f"must match [A-Za-z0-9_-]{{1,64}}, got {self.federation!r}"))
        if self.rounds < 0:
            out.append(("rounds", f"must be >= 0, got {self.rounds}"))
        if not self.state_dir:
            out.append(("state_dir", "must not be empty"))
        if not 0 <= self.session_expiry <= 0xFFFFFFFF:
            out.append(("session_expiry", f"must be in 0..4294967295 seconds, got {self.session_expiry}"))
        if self.security.signing_key and not self.broker.mqtt5:
            # Signatures are MQTT 5 user properties (docs/PROTOCOL.md §1.4): on 3.1.1 the agents
            # would get every model and task unsigned and drop them all.
            out.append(("security.signing_key", "signatures travel as MQTT 5 user properties, which [broker] "
                        "protocol = \"3.1.1\" cannot carry: use an MQTT 5 broker to sign models, or leave "
                        "signing_key empty (docs/PROTOCOL.md §1.1)"))
        p = self.privacy
        if p.enabled and not (p.expected_per_round or self.round.agents_per_round):
            out.append(("privacy.expected_per_round", "DP needs the expected devices per round "
                        "(set it, or [round] agents_per_round)"))
        if p.enabled and p.adaptive_clip:
            sigma_b = p.count_stddev or (p.expected_per_round or self.round.agents_per_round) / COUNT_STDDEV_DIVISOR
            if 2 * sigma_b <= p.noise_multiplier:
                out.append(("privacy.count_stddev", f"the clipped-count noise {sigma_b:g} must exceed noise_multiplier/2 "
                            f"= {p.noise_multiplier / 2:g} to split the budget (Andrew et al. 2021); raise it or lower z"))
        if p.enabled and p.target_epsilon and not self.rounds:
            out.append(("privacy.target_epsilon", "plans the noise for `rounds` rounds and stops there: "
                        "set rounds > 0 (the planning horizon), or use noise_multiplier and budget instead"))
        if p.enabled and self.round.mode == "async":
            out.append(("privacy.mode", "differential privacy needs synchronous rounds ([round] mode = sync)"))
        sa = self.secagg
        if self.compression.mode in COMPRESSION_MODES[1:] and sa.enabled:  # a bad mode: [compression] says so
            out.append(("compression.mode", f"{self.compression.mode!r} cannot be combined with secure aggregation "
                        "([secagg] mode), which quantizes and masks the updates itself: set one of them off"))
        if sa.enabled:
            if self.round.mode == "async":
                out.append(("secagg.mode", "secure aggregation needs synchronous rounds ([round] mode = sync)"))
            if self.strategy.name not in SECAGG_STRATEGIES:
                out.append(("secagg.mode", f"strategy {self.strategy.name!r} looks at single updates, which secure "
                            f"aggregation hides; use one of {', '.join(SECAGG_STRATEGIES)}"))
            if p.enabled and p.mode != "distributed":
                out.append(("privacy.mode", "with secure aggregation the devices add the noise inside the masked "
                            "sum: use mode = distributed (the distributed discrete Gaussian)"))
            if p.enabled and sa.weighting == "samples":
                out.append(("secagg.weighting", "under DP every update counts once (a fixed denominator); "
                            "use auto or uniform"))
            if p.enabled and p.adaptive_clip:
                out.append(("privacy.adaptive_clip", "is not available with secure aggregation (the clipped count "
                            "would have to be aggregated securely too)"))
            if p.enabled and p.mode == "distributed":
                small = _secagg_small_draw_probability(self)
                if small is None:
                    out.append(("privacy.population", "distributed DP with secure aggregation needs the population"))
                elif small > p.delta / SMALL_DRAW_DELTA_SHARE:
                    out.append(("round.min_agents", f"a Poisson draw from {self.round.min_agents} online devices is "
                                f"too small for secure aggregation with probability {small:.2g}, above "
                                f"delta/{SMALL_DRAW_DELTA_SHARE:g}: raise min_agents or expected_per_round"))
            if sa.threshold >= 1 and self.round.min_agents < sa.threshold + 1:
                out.append(("round.min_agents", f"secure aggregation with threshold {sa.threshold:g} needs at least "
                            f"{int(sa.threshold) + 1} agents per round"))
        out += _hierarchy_problems(self)
        out += _workers_problems(self)
        labels = self.onnx.class_labels
        if labels:
            try:
                model = self.model.build()
            except ModelError:
                model = None  # [model] reports its own problem
            if model is not None and (not model.classifier or len(labels) != model.n_outputs):
                classes = model.n_outputs if model.classifier else "none: a regressor"
                out.append(("onnx.class_labels", f"needs one name per class ({classes}), got {len(labels)}"))
        return out
