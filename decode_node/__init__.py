"""Decode node role (to be built on the engine core).

A decode node runs :class:`disagg.engine.LLMEngine` with ``role="decode"``.
Requests prefilled remotely are submitted with ``kv_mode=KVMode.LOAD_REMOTE``:
the engine reserves blocks past its own cached prefix (``KVLoadTarget``),
waits until the transport filled them, then decodes. Its prefix cache is
queried with ``LLMEngine.cached_prefix``. The process, its control socket and
launch script are added by the nodes-and-router issue.
"""
