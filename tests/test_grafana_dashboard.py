"""deploy/grafana/disagg-dashboard.json: well-formed, and every query uses exported metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from router_helpers import router_exposition

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "disagg-dashboard.json"
METRIC = re.compile(r"\bdisagg_[a-z0-9_]+")
BY = re.compile(r"\bby\s*\(([^)]*)\)")
LEGEND = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")
SCRAPE_LABELS = {"instance", "job"}      # added by Prometheus, not by the router


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    """``{sample name a query may use: its label names}`` (a real registry's exposition)."""
    return router_exposition()


def _panels(dash: dict) -> list[dict]:
    """Every panel, including those nested in (collapsed) rows."""
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def _targets(dash: dict) -> list[tuple[str, dict]]:
    return [(p["title"], t) for p in _panels(dash) for t in p.get("targets", [])]


def test_dashboard_is_well_formed(dashboard):
    for key in ("title", "uid", "schemaVersion", "panels", "templating", "time"):
        assert key in dashboard, key
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        assert {"type", "title", "gridPos"} <= set(p), p.get("title")
        g = p["gridPos"]
        assert all(isinstance(g.get(k), int) for k in "hwxy"), p["title"]
        assert g["x"] >= 0 and g["w"] > 0 and g["h"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["targets"], f"panel {p['title']!r} has no targets"
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"]["uid"] == "${datasource}", p["title"]


def test_panels_do_not_overlap(dashboard):
    cells: dict[tuple[int, int], str] = {}
    for p in dashboard["panels"]:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[x, y]!r}"
                cells[x, y] = p["title"]


def test_required_panels_present(dashboard):
    exprs = " ".join(t["expr"] for _, t in _targets(dashboard))
    for name in ("disagg_time_to_first_token_seconds_bucket",
                 "disagg_inter_token_latency_seconds_bucket",
                 "disagg_e2e_request_latency_seconds_bucket", "disagg_requests_total",
                 "disagg_route_decisions_total", "disagg_fallbacks_total",
                 "disagg_kv_transfer_bytes_total", "disagg_kv_transfer_seconds_total",
                 "disagg_queue_depth", "disagg_kv_usage_ratio", "disagg_nodes",
                 "disagg_http_errors_total", "disagg_router_overhead_seconds_bucket"):
        assert name in exprs, name
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(disagg_time_to_first_token" in exprs


def test_every_query_uses_exported_metrics_and_labels(dashboard, exported):
    checked = 0
    for title, t in _targets(dashboard):
        names = METRIC.findall(t["expr"])
        assert names, f"{title}: {t['expr']!r} references no disagg_ metric"
        labels = set().union(*(exported.get(n, set()) for n in names)) | SCRAPE_LABELS
        for name in names:
            assert name in exported, f"{title}: {name} is not exported by RouterMetrics"
            checked += 1
        if "histogram_quantile" in t["expr"]:
            assert all(n.endswith("_bucket") for n in names), title
        for group in BY.findall(t["expr"]):
            for label in filter(None, (x.strip() for x in group.split(","))):
                assert label in labels, f"{title}: grouping by unknown label {label!r}"
        for label in LEGEND.findall(t.get("legendFormat", "")):
            assert label in labels, f"{title}: legend uses unknown label {label!r}"
    assert checked >= 13
