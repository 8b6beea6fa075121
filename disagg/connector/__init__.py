"""KV connectors: the two-halves interface between an engine and KV transport."""

from disagg.connector.base import (KVConnectorMetadata, KVConnectorScheduler,
                                   KVConnectorWorker, NoOpConnector, make_connector)

__all__ = ["KVConnectorMetadata", "KVConnectorScheduler", "KVConnectorWorker",
           "NoOpConnector", "make_connector"]
