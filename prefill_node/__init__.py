"""Prefill node role: computes prompts' KV and ships the blocks to decode nodes.

A prefill node runs :class:`disagg.engine.LLMEngine` with ``role="prefill"``
and its own TP degree, inside the shared loop of :mod:`disagg.node.server`.
Each ``Prefill`` message from the router becomes a prefill-only request whose
KV is sent (layer by layer where enabled) to the decode node's reserved
blocks; the first token goes back to the router at once. Start one with
``disagg prefill-node`` or ``scripts/launch_prefill.sh``.
"""
