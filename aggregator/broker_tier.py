"""What fedmqtt may ask of the broker tier it is configured for (deploy/scale.md "Broker tier").

One rule so far, for the shared-subscription ingest workers of DESIGN.md §7
(``[workers] count``, docs/PROTOCOL.md §10): a ``$share/<group>/...``
subscription needs ``[broker] protocol = "5"``. The one MQTT 3.1.1-only broker of the tier, a NATS server
cluster (2.9), grants a ``$share/`` subscription and then delivers nothing
to it: workers would sit idle while updates pile up unread, with no error
anywhere. mosquitto does deliver shared subscriptions to 3.1.1 clients, but
an MQTT 3.1.1 client cannot tell which broker it talks to (a 3.1.1 CONNACK
carries nothing), so the rule goes by the protocol: any broker worth
running workers on (mosquitto, EMQX, HiveMQ, VerneMQ) speaks MQTT 5.
The config check (``aggregator.config``) refuses workers with it, naming
``broker.protocol``.
"""

from __future__ import annotations

from edge_agent.config import BrokerConfig

SHARE_PREFIX = "$share/"


def shared_subscription_problem(broker: BrokerConfig) -> str | None:
    """Why ``broker`` cannot serve shared subscriptions, or None when it can."""
    if broker.mqtt5:
        return None
    return ("shared subscriptions ($share/...) need MQTT 5: with protocol = \"3.1.1\" the broker may be a NATS "
            "server, which grants a $share/ subscription and never delivers to it; run one aggregator without "
            "workers, or use an MQTT 5 broker (deploy/scale.md, \"Broker tier\")")
