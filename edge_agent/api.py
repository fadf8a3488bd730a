"""The device's Python API: one edge agent with your own model and data.

``fedmqtt.Agent`` and ``fedmqtt.run_agent`` are re-exported from here.
``fedmqtt agent`` (the CLI) runs the same class, so a device configured by
a TOML file and one configured from Python behave alike. Nothing here
imports the aggregator or its extras.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping

from .agent import AgentCore, AgentRunner
from .agent_config import AgentConfig, AgentModelConfig
from .agent_store import AgentStore
from .config import ConfigError, config_of
from .data import local_data
from .lifecycle import LoopService
from .model_api import FedModel, ModelError
from .model_loader import load_model, named
from .mqtt import Loop
from .spec import MODEL_KINDS

log = logging.getLogger("fedmqtt.agent")


def agent_config(config: AgentConfig | str | Path | Mapping[str, Any] | None) -> AgentConfig:
    """An :class:`AgentConfig` from an object, a TOML file or a dict of the same keys (checked)."""
    return AgentConfig() if config is None else config_of(AgentConfig, config, "agent.toml")


def agent_model(cfg: AgentModelConfig) -> FedModel | None:
    """The device's own model from ``[model]``: None means any built-in kind the federation sends."""
    if not cfg.kind or cfg.kind in MODEL_KINDS:
        return None
    return load_model(cfg.kind, cfg.options)


class Agent(LoopService):
    """One edge agent: trains ``model`` on ``data`` whenever the federation selects it.

    ``config`` is an :class:`AgentConfig` (or a path to its TOML file, or a
    dict of its keys): the agent id, federation, broker, state directory,
    security. ``model`` is a :class:`fedmqtt.Model` instance; without it the
    config's ``[model]`` decides (none: any built-in model the federation
    sends). ``data`` is anything :func:`edge_agent.data.local_data` takes:
    a path, ``(X, y)``, a callable returning them, or
    :class:`fedmqtt.Batches`; without it, ``config.data`` names a file.

    The data is checked against the model here, so a device that could
    never train fails at once with a :class:`ModelError` or ``DataError``
    naming the problem. Use :meth:`run` in the foreground, or
    :meth:`start` / :meth:`wait` / :meth:`stop` (also as a context manager).
    """

    def __init__(self, config: AgentConfig | str | Path | Mapping[str, Any] | None = None, *,
                 model: FedModel | None = None, data: Any = None,
                 on_connect: Callable[["Agent"], None] | None = None, loop: Loop | None = None) -> None:
        cfg = agent_config(config)
        if not cfg.agent_id:
            raise ConfigError("agent_id: must be set")
        self.config = cfg
        if data is None:
            if not cfg.data:
                raise ConfigError("data: must name the local data file (.npz or .csv), or pass data= in Python")
            data = cfg.data
        self.data = local_data(data, holdout=cfg.holdout, seed=cfg.seed, label_column=cfg.label_column)
        self.model = named(model) if model is not None else agent_model(cfg.model)
        capabilities = (cfg.model.kind,) if cfg.model.kind in MODEL_KINDS else MODEL_KINDS
        verifier = _verifier(cfg)
        identity, peer_verifier = secagg_identity(cfg)
        self.core = AgentCore(agent_id=cfg.agent_id, fed=cfg.federation, data=self.data, seed=cfg.seed,
                              capabilities=capabilities, model=self.model, verifier=verifier,
                              private=cfg.hide_sample_count, secagg_identity=identity,
                              secagg_verifier=peer_verifier)
        self._init_loop(loop)
        self.thread_name = f"fedmqtt-agent-{cfg.agent_id}"
        self._on_connect = on_connect
        self.runner = AgentRunner(
            self.loop, self.core, cfg.broker, on_done=self._done,
            store=AgentStore(cfg.state_dir) if cfg.state_dir else None,
            eligibility=cfg.eligibility, on_connect=self._connected,
            on_stop=lambda _runner, problem: self._failed(f"broker: {problem}"),
        )

    # -- what a caller sees ----------------------------------------------------

    @property
    def problem(self) -> tuple[str, str] | None:
        """Why this device cannot train, as ``(code, detail)``, or None (also in its retained status)."""
        return self.core.problem

    @property
    def updates_sent(self) -> int:
        return self.core.updates_sent

    # -- running ---------------------------------------------------------------

    def run(self) -> None:
        """Connect and serve in this thread until :meth:`stop` (or the federation is done, with
        ``exit_when_done``). Raises ConfigError if the broker refused this agent for good."""
        log.info("agent %s: %d training and %d holdout samples, broker %s:%d", self.config.agent_id,
                 self.data.num_samples, len(self.data.X_holdout), self.config.broker.host, self.config.broker.port)
        super().run()

    def _begin(self) -> None:
        self.runner.start()

    def _connected(self, _runner: AgentRunner) -> None:
        if self._on_connect is not None:
            self._on_connect(self)

    def _done(self, _runner: AgentRunner) -> None:
        self.finished.set()
        if self.config.exit_when_done and self._own_loop:
            self.loop.stop()


def run_agent(config: AgentConfig | str | Path | Mapping[str, Any] | None = None, *, model: FedModel | None = None,
              data: Any = None) -> Agent:
    """Run one agent in the foreground until it is stopped or, with ``exit_when_done``, the federation ends."""
    agent = Agent(config, model=model, data=data)
    agent.run()
    return agent


def _verifier(cfg: AgentConfig):
    if not cfg.security.trusted_keys:
        log.warning("no [security] trusted_keys: models and tasks are accepted unsigned (development only)")
        return None
    from .signing import Verifier

    try:
        return Verifier(cfg.security.trusted_keys)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"security.trusted_keys: {exc}") from None


def secagg_identity(cfg: AgentConfig) -> tuple[object | None, object | None]:
    """(DeviceIdentity, PeerVerifier) of a provisioned device, or (None, None).

    Provisioned means the broker section names a client certificate, its key
    and the CA. A device without the ``cryptography`` package cannot take part
    in secure aggregation at all, so it needs neither.
    """
    b = cfg.broker
    if not (cfg.security.sign_secagg_keys and b.cert_file and b.key_file and b.ca_file):
        return None, None
    try:
        from .secagg.identity import DeviceIdentity, PeerVerifier
    except ImportError:
        return None, None
    try:
        identity = DeviceIdentity(b.cert_file, b.key_file)
        if identity.common_name != cfg.agent_id:
            raise ValueError(f"{b.cert_file} is the certificate of {identity.common_name!r}, not of agent "
                             f"{cfg.agent_id!r}: peers would refuse its keys")
        return identity, PeerVerifier(b.ca_file, cfg.federation)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"broker.cert_file/key_file: cannot sign secure-aggregation keys: {exc}") from None


__all__ = ["Agent", "run_agent", "agent_config", "ModelError"]
