"""Prefill node role (to be built on the engine core).

A prefill node runs :class:`disagg.engine.LLMEngine` with ``role="prefill"``
and its own TP degree. It submits requests with
``kv_mode=KVMode.PREFILL_ONLY``: the engine computes the prompt, samples the
first token, keeps the blocks pinned and reports them as a ``KVExport`` for
the transport to ship. The process, its control socket and launch script are
added by the nodes-and-router issue.
"""
