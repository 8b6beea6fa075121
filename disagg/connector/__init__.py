"""KV connectors: the two-halves interface between an engine and KV transport.

``base`` holds the interfaces, ``transfer_scheduler`` / ``transfer_worker``
the transport connector, ``factory.make_connector`` picks one for a config;
import each name from its module.
"""
