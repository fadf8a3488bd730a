"""Aggregator configuration (``fedmqtt aggregator --config aggregator.toml``).

Loaded by the one loader in :mod:`edge_agent.config`; every key below is also
a flag (``[round] timeout`` is ``--round-timeout``). See
``deploy/aggregator.toml`` for an annotated example.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edge_agent.config import BrokerConfig
from edge_agent.spec import MODEL_KINDS, ModelSpec, spec_problems
from edge_agent.wire import valid_id

from .strategies import STRATEGIES


@dataclass
class ModelConfig:
    """The global model's architecture and initialisation."""

    kind: str = field(default="softmax", metadata={"help": f"model kind: {'|'.join(MODEL_KINDS)}"})
    n_features: int = field(default=64, metadata={"help": "input features"})
    n_outputs: int = field(default=10, metadata={"help": "classes (1 for linear regression)"})
    hidden: list[int] = field(default_factory=list, metadata={"help": "mlp hidden layer sizes"})
    seed: int = field(default=0, metadata={"help": "seed of the initial parameters"})

    def spec(self) -> ModelSpec:
        return ModelSpec(self.kind, self.n_features, self.n_outputs, tuple(self.hidden))

    def problems(self) -> list[tuple[str, str]]:
        return spec_problems(self.kind, self.n_features, self.n_outputs, tuple(self.hidden))


@dataclass
class TrainingConfig:
    """Local training settings sent to the agents in every task."""

    epochs: int = field(default=5, metadata={"help": "local epochs per round"})
    batch_size: int = field(default=32, metadata={"help": "local minibatch size"})
    lr: float = field(default=0.1, metadata={"help": "local SGD learning rate"})

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if not 1 <= self.epochs <= 10_000:
            out.append(("epochs", f"must be in 1..10000, got {self.epochs}"))
        if not 1 <= self.batch_size <= 1_000_000:
            out.append(("batch_size", f"must be in 1..1000000, got {self.batch_size}"))
        if not 0 < self.lr <= 100:
            out.append(("lr", f"must be > 0 and <= 100, got {self.lr}"))
        return out


@dataclass
class RoundConfig:
    """When rounds open and close."""

    min_agents: int = field(default=1, metadata={"help": "online agents needed before the first round opens"})
    agents_per_round: int = field(default=0, metadata={"help": "agents selected per round (0: every online agent)"})
    quorum: int = field(default=1, metadata={"help": "updates needed to close a round at its deadline"})
    timeout: float = field(default=60.0, metadata={"help": "seconds from opening a round to its deadline"})
    seed: int = field(default=0, metadata={"help": "seed of the agent selection"})

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.min_agents < 1:
            out.append(("min_agents", f"must be >= 1, got {self.min_agents}"))
        if self.agents_per_round < 0:
            out.append(("agents_per_round", f"must be >= 0, got {self.agents_per_round}"))
        if self.quorum < 1:
            out.append(("quorum", f"must be >= 1, got {self.quorum}"))
        if self.agents_per_round and self.quorum > self.agents_per_round:
            out.append(("quorum", f"{self.quorum} can never be met with agents_per_round = {self.agents_per_round}"))
        if not 0.1 <= self.timeout <= 7 * 24 * 3600:
            out.append(("timeout", f"must be between 0.1 s and a week, got {self.timeout}"))
        return out


@dataclass
class StrategyConfig:
    """The aggregation rule and its hyperparameters (docs/strategies.md)."""

    name: str = field(default="fedavg", metadata={"help": f"aggregation rule: {'|'.join(STRATEGIES)}"})
    prox_mu: float = field(default=0.0, metadata={"help": "FedProx proximal term mu sent to the agents (0: off)"})

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.name not in STRATEGIES:
            out.append(("name", f"must be one of {', '.join(STRATEGIES)}, got {self.name!r}"))
        if not 0.0 <= self.prox_mu <= 1e6:
            out.append(("prox_mu", f"must be >= 0, got {self.prox_mu}"))
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
class AggregatorConfig:
    """Everything the aggregator service needs."""

    federation: str = field(default="demo", metadata={"help": "federation id ([A-Za-z0-9_-]{1,64})"})
    rounds: int = field(default=20, metadata={"help": "rounds to run (0: run until stopped)"})
    state_dir: str = field(default="fedmqtt-state", metadata={"help": "checkpoint directory"})
    test_data: str = field(default="", metadata={"help": "optional central test set (.npz or .csv)"})
    label_column: str = field(default="label", metadata={"help": "label column of a .csv test set"})
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    round: RoundConfig = field(default_factory=RoundConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    onnx: OnnxConfig = field(default_factory=OnnxConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if not valid_id(self.federation):
            out.append(("federation", f"must match [A-Za-z0-9_-]{{1,64}}, got {self.federation!r}"))
        if self.rounds < 0:
            out.append(("rounds", f"must be >= 0, got {self.rounds}"))
        if not self.state_dir:
            out.append(("state_dir", "must not be empty"))
        labels = self.onnx.class_labels
        if labels and (self.model.kind == "linear" or len(labels) != self.model.n_outputs):
            out.append(("onnx.class_labels", f"needs one name per class ({self.model.n_outputs}), got {len(labels)}"))
        return out
