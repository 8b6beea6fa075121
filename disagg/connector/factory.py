"""Which KV connector an engine config gets: the interfaces' implementations, picked."""

from __future__ import annotations

from functools import partial
from typing import Callable

from disagg.connector.base import KVConnectorScheduler, KVConnectorWorker, NoOpConnector
from disagg.connector.transfer_scheduler import TransferScheduler
from disagg.connector.transfer_worker import TransferWorker


def make_connector(config, model_cfg) -> tuple[KVConnectorScheduler,
                                               Callable[[], KVConnectorWorker] | None]:
    """The scheduler half and a picklable factory for the worker half of ``config``.

    ``config.kv_transfer`` set → the transport connector; else no connector.
    """
    if config.kv_transfer is None:
        return NoOpConnector(), None
    return TransferScheduler(config), partial(TransferWorker, config, model_cfg)
