"""Agent configuration (``fedmqtt agent --config agent.toml``); see deploy/agent.toml."""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import BrokerConfig
from .eligibility import EligibilityConfig
from .signing import valid_public_key
from .wire import valid_id


@dataclass
class AgentSecurityConfig:
    """What the device trusts."""

    trusted_keys: list[str] = field(
        default_factory=list,
        metadata={"help": "Ed25519 public keys (64 hex digits) whose signed models and tasks are accepted; "
                          "empty: accept unsigned (development only)"},
    )

    sign_secagg_keys: bool = field(
        default=True,
        metadata={"help": "in a provisioned federation (broker cert_file, key_file and ca_file set): sign secure-"
                          "aggregation keys with this device's certificate and take part only with peers whose keys "
                          "are signed by theirs"},
    )

    def problems(self) -> list[tuple[str, str]]:
        bad = [k for k in self.trusted_keys if not valid_public_key(k)]
        return [("trusted_keys", f"must be raw Ed25519 public keys as 64 hex digits, got {bad}")] if bad else []


@dataclass
class AgentConfig:
    """Everything one edge agent needs."""

    federation: str = field(default="demo", metadata={"help": "federation id"})
    agent_id: str = field(default="", metadata={"help": "this device's id ([A-Za-z0-9_-]{1,64})"})
    data: str = field(default="", metadata={"help": "local data: .npz with X and y, or .csv"})
    label_column: str = field(default="label", metadata={"help": "label column of a .csv file"})
    holdout: float = field(default=0.2, metadata={"help": "fraction held out to evaluate the global model"})
    seed: int = field(default=0, metadata={"help": "seed of local shuffling and the holdout split"})
    exit_when_done: bool = field(default=False, metadata={"help": "exit when the federation says it is done"})
    hide_sample_count: bool = field(
        default=False,
        metadata={"help": "never publish the local sample count in the retained status "
                          "(a DP federation's first task turns this on anyway)"},
    )
    state_dir: str = field(
        default="fedmqtt-agent-state",
        metadata={"help": "where the outbox and the trained rounds are kept across restarts (empty: memory only)"},
    )
    eligibility: EligibilityConfig = field(default_factory=EligibilityConfig)
    security: AgentSecurityConfig = field(default_factory=AgentSecurityConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if not valid_id(self.federation):
            out.append(("federation", f"must match [A-Za-z0-9_-]{{1,64}}, got {self.federation!r}"))
        if not valid_id(self.agent_id):
            out.append(("agent_id", f"must be set and match [A-Za-z0-9_-]{{1,64}}, got {self.agent_id!r}"))
        if not self.data:
            out.append(("data", "must name the local data file (.npz or .csv)"))
        if not 0.0 <= self.holdout < 1.0:
            out.append(("holdout", f"must be in [0, 1), got {self.holdout}"))
        return out
