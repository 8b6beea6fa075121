"""Decode node role: continuous batching with chunked prefill and a prefix cache.

A decode node runs :class:`disagg.engine.LLMEngine` with ``role="decode"``
inside the shared loop of :mod:`disagg.node.server`. A ``Generate`` the
router marks local is prefilled here; a remote one reserves blocks past the
node's cached prefix (reported to the router as a ``KVTarget``), waits for the
prefill node's KV and first token, and decodes. If the remote prefill fails
the router (or the engine's own KV timeout) falls back to a local prefill.
Start one with ``disagg decode-node`` or ``scripts/launch_decode.sh``.
"""
