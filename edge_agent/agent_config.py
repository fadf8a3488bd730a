"""Agent configuration (``fedmqtt agent --config agent.toml``); see deploy/agent.toml."""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import BrokerConfig
from .eligibility import EligibilityConfig
from .signing import valid_public_key
from .spec import MODEL_KINDS, custom_kind
from .wire import valid_id


@dataclass
class AgentModelConfig:
    """Which model this device trains (``[model]``).

    Empty ``kind``: whatever built-in model (softmax, mlp, linear) the
    federation sends. A built-in name: only that kind. Your own model:
    ``"package.module:ClassName"`` or an entry-point name of group
    ``fedmqtt.models``, the same as in the aggregator's config, with its
    constructor's keyword arguments in ``[model.options]``. Only this
    file decides what code a device imports, never a message.
    """

    kind: str = field(default="", metadata={
        "help": "empty: any built-in model the federation sends; a built-in kind; or your own "
                "'package.module:ClassName' (or fedmqtt.models entry-point name), as on the aggregator"})
    options: dict = field(default_factory=dict, metadata={
        "help": "[model.options]: keyword arguments of a custom model's class (the same as the aggregator's)"})

    def problems(self) -> list[tuple[str, str]]:
        if self.kind and self.kind not in MODEL_KINDS and not custom_kind(self.kind):
            return [("kind", f"must be empty, one of {', '.join(MODEL_KINDS)}, or 'package.module:ClassName', "
                             f"got {self.kind!r}")]
        if self.options and (not self.kind or self.kind in MODEL_KINDS):
            return [("options", "only a custom model kind takes options")]
        return []


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
    data: str = field(default="", metadata={"help": "local data: .npz with X and y, or .csv (the Python API "
                                                    "also takes arrays, a callable or batches)"})
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
    model: AgentModelConfig = field(default_factory=AgentModelConfig)
    eligibility: EligibilityConfig = field(default_factory=EligibilityConfig)
    security: AgentSecurityConfig = field(default_factory=AgentSecurityConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if not valid_id(self.federation):
            out.append(("federation", f"must match [A-Za-z0-9_-]{{1,64}}, got {self.federation!r}"))
        if not valid_id(self.agent_id):
            out.append(("agent_id", f"must be set and match [A-Za-z0-9_-]{{1,64}}, got {self.agent_id!r}"))
        if not 0.0 <= self.holdout < 1.0:
            out.append(("holdout", f"must be in [0, 1), got {self.holdout}"))
        if self.security.trusted_keys and not self.broker.mqtt5:
            # Signatures are MQTT 5 user properties (docs/PROTOCOL.md §1.4): on 3.1.1 none arrives,
            # so a device that pins keys would drop every model and task as unsigned.
            out.append(("security.trusted_keys", "signatures travel as MQTT 5 user properties, which [broker] "
                        "protocol = \"3.1.1\" cannot carry: use an MQTT 5 broker to verify models, or leave "
                        "trusted_keys empty (docs/PROTOCOL.md §1.1)"))
        return out
