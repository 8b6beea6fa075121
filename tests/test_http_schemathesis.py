"""Schemathesis against a running router's /openapi.json: router + one decode node (no
prefill node) on the embedded SmolLM2. Every operation gets schema-valid (positive)
bodies; no response may be a 5xx, and every response must match its declared status,
content type and schema.

Kept short for a 2-core CI box: the decode node runs with ``--max-model-len 40`` so any
``max_tokens`` past the context is a quick 400, the router admits at most 4 sequences
(``n`` x prompts beyond that is a quick 400), ``model`` is set to the served name (a
random one is only ever a 404), and each operation gets a fixed number of examples
with a wall-clock budget of its own (so a slow machine still exercises every operation).
"""

from __future__ import annotations

import time

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance, response_schema_conformance, status_code_conformance)

from conftest import needs_smollm2
from serving_helpers import MODEL, running_cluster

pytestmark = [needs_smollm2, pytest.mark.slow]

MAX_EXAMPLES = 25
BUDGET_S = {"POST": 50.0, "GET": 10.0}      # per operation, by method
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from running_cluster(tmp_path_factory, num_prefill=0, policy="local", max_inflight=4,
                               decode_args=("--max-model-len", "40"))


def test_every_operation_conforms_to_the_schema(cluster):
    url = cluster.http_url
    schema = schemathesis.openapi.from_url(url + "/openapi.json", timeout=10)
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = sorted(op.label for op in operations)
    assert "POST /v1/completions" in labels and "POST /v1/chat/completions" in labels
    calls: dict[str, int] = {}

    for op in operations:
        deadline = time.monotonic() + BUDGET_S.get(op.method.upper(), 10.0)

        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=GenerationMode.POSITIVE))
        def check(case):
            if time.monotonic() > deadline:
                return                                   # budget spent: stop calling
            if isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = MODEL
            case.call_and_validate(base_url=url, checks=CHECKS, timeout=60)
            calls[op.label] = calls.get(op.label, 0) + 1

        check()
    # A generating call takes up to seconds on a busy 2-core box; every operation must
    # still have been exercised several times within its budget.
    assert calls.get("POST /v1/completions", 0) >= 5, calls
    assert calls.get("POST /v1/chat/completions", 0) >= 5, calls
