"""The router: OpenAI-compatible HTTP in front, nodes behind a ZeroMQ control socket.

It tokenises each prompt, hashes its blocks (:func:`disagg.kv_cache.hashing.hash_blocks`,
the engines' own hashes) to guess each decode node's prefix hits, picks a
decode node (load + prefix affinity) and a prefill node (load), and asks a
routing policy whether the prompt is prefilled locally on the decode node or
remotely; then it streams tokens back. Start it with ``disagg router``.

    app.py              HTTP endpoints (FastAPI)         launch.py   flags, uvicorn on uvloop
    dispatch.py (+ inflight.py) requests, fallbacks   control_handlers.py  node messages
    nodes.py            node table, health, picking      prefix_index.py      cache guesses
    responder.py        tokens → OpenAI bodies / SSE     protocol.py  OpenAI request models
    openai_responses.py OpenAI response shapes           openapi_schema.py  /openapi.json
    errors.py           ProtocolError (the API's errors) model_limits.py  model, context, vocab
    tokenizer.py        tokens + chat template, no torch  detokenizer.py  incremental text
    policy.py (+ route_types, calibration, estimates)
    metrics.py          Prometheus metrics (prometheus_client)
    migration.py        a lost decode node's requests move on   connections.py  node deaths
"""
