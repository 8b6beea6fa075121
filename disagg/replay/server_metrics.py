"""What a disagg router says about a replay: requests by route, KV bytes moved.

The router's ``/metrics`` is scraped before and after a run and the counters
subtracted, so earlier traffic (warm-up, other runs) does not count. Against a
server that is not this system (no ``disagg_requests_total``), ``scrape``
returns None and the report simply has no server section.
"""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset], float]
"""``{(sample name, frozenset(labels.items())): value}``."""


def scrape(base_url: str, headers: dict[str, str] | None = None,
           timeout_s: float = 10.0) -> Samples | None:
    """The endpoint's ``/metrics`` samples, or None when it is not a disagg router."""
    try:
        r = httpx.get(base_url.rstrip("/") + "/metrics", headers=headers or {},
                      timeout=timeout_s)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    try:
        samples = {(s.name, frozenset(s.labels.items())): s.value
                   for family in text_string_to_metric_families(r.text) for s in family.samples}
    except ValueError:
        return None
    if not any(name == "disagg_requests_total" for name, _ in samples):
        return None
    return samples


def _total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def _by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (n, labels), v in samples.items():
        if n == name:
            key = dict(labels).get(label, "")
            out[key] = out.get(key, 0.0) + v
    return out


def server_delta(before: Samples | None, after: Samples | None) -> dict | None:
    """Counters that moved between two scrapes::

        {"routes": {"local": 12, "remote": 30, "fallback": 1},   # finished requests
         "statuses": {"ok": 43},
         "kv_bytes": 2.2e7, "kv_seconds": 0.41,
         "prefix_cached_tokens": 1024, "fallbacks": 1}
    """
    if before is None or after is None:
        return None

    def moved(a: dict[str, float], b: dict[str, float]) -> dict[str, int]:
        keys = sorted(set(a) | set(b))
        return {k: round(b.get(k, 0) - a.get(k, 0)) for k in keys if b.get(k, 0) != a.get(k, 0)}

    req = "disagg_requests_total"
    return {
        "routes": moved(_by_label(before, req, "route"), _by_label(after, req, "route")),
        "statuses": moved(_by_label(before, req, "status"), _by_label(after, req, "status")),
        "kv_bytes": _total(after, "disagg_kv_transfer_bytes_total")
        - _total(before, "disagg_kv_transfer_bytes_total"),
        "kv_seconds": _total(after, "disagg_kv_transfer_seconds_total")
        - _total(before, "disagg_kv_transfer_seconds_total"),
        "prefix_cached_tokens": round(_total(after, "disagg_decode_prefix_cached_tokens_total")
                                      - _total(before, "disagg_decode_prefix_cached_tokens_total")),
        "fallbacks": round(_total(after, "disagg_fallbacks_total")
                           - _total(before, "disagg_fallbacks_total")),
    }
