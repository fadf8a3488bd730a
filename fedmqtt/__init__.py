"""fedmqtt: federated learning for fleets of small devices, carried by MQTT.

This module is the whole public API (docs/api.md). Names are imported
lazily, on first use, so that ``import fedmqtt`` on a device loads nothing
of the aggregator, onnx, dp-accounting or torch until it asks for them.

Devices::

    agent = fedmqtt.Agent(fedmqtt.AgentConfig(agent_id="car-7", federation="fleet"),
                          model=MyModel(), data=(X, y))
    agent.run()

The server::

    fedmqtt.run_aggregator("aggregator.toml", model=MyModel())

A model is a :class:`Model` (any framework: implement ``fit``) or a
:class:`NumpyModel` (implement ``loss_and_grads`` and ``predict``); PyTorch
modules are wrapped by :class:`TorchModel` (``pip install 'fedmqtt[torch]'``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from edge_agent import __version__

# name -> module it lives in. The one table of what fedmqtt promises.
_EXPORTS: dict[str, str] = {
    # running a device
    "Agent": "edge_agent.api",
    "run_agent": "edge_agent.api",
    "AgentConfig": "edge_agent.agent_config",
    # running the server
    "Aggregator": "aggregator.api",
    "run_aggregator": "aggregator.api",
    "AggregatorConfig": "aggregator.config",
    "LocalBroker": "aggregator.broker",  # a private mosquitto on a free loopback port, for trying things out
    # both
    "BrokerConfig": "edge_agent.config",
    "load_config": "edge_agent.config",
    # models
    "Model": "edge_agent.model_api",
    "NumpyModel": "edge_agent.model_api",
    "TrainData": "edge_agent.model_api",
    "TrainConfig": "edge_agent.wire",
    "SoftmaxRegression": "edge_agent.models",
    "MLP": "edge_agent.models",
    "LinearRegression": "edge_agent.models",
    "TorchModel": "edge_agent.torch_model",
    "load_model": "edge_agent.model_loader",
    # data
    "Batches": "edge_agent.data",
    "local_data": "edge_agent.data",
    # errors
    "ConfigError": "edge_agent.config",
    "DataError": "edge_agent.data",
    "ModelError": "edge_agent.model_api",
    "WireError": "edge_agent.wire",
}
# Public names that differ from the name inside their module.
_RENAMED = {"Model": "FedModel", "load_config": "load"}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fedmqtt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), _RENAMED.get(name, name))
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # what type checkers and IDEs see; nothing of this runs
    from aggregator.api import Aggregator, run_aggregator
    from aggregator.broker import LocalBroker
    from aggregator.config import AggregatorConfig
    from edge_agent.agent_config import AgentConfig
    from edge_agent.api import Agent, run_agent
    from edge_agent.config import BrokerConfig, ConfigError
    from edge_agent.config import load as load_config
    from edge_agent.data import Batches, DataError, local_data
    from edge_agent.model_api import FedModel as Model
    from edge_agent.model_api import ModelError, NumpyModel, TrainData
    from edge_agent.model_loader import load_model
    from edge_agent.models import MLP, LinearRegression, SoftmaxRegression
    from edge_agent.torch_model import TorchModel
    from edge_agent.wire import TrainConfig, WireError
