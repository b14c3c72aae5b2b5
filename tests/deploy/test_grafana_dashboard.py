"""deploy/grafana/sluice-pipeline.json: the panels the issue asks for are there, latencies
are percentiles from histograms, and every query goes through the datasource variable."""

from __future__ import annotations

import re

from tests.deploy.monitoring import dashboard, dashboard_exprs, dashboard_panels, used_metrics


def test_every_panel_queries_the_chosen_prometheus() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = set()
    for panel in dashboard_panels():
        ids.add(panel["id"])
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        assert panel["description"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    assert len(ids) == len(list(dashboard_panels())), "panel ids must be unique"


def test_panels_do_not_overlap() -> None:
    cells: set[tuple[int, int]] = set()
    for panel in dashboard()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not mine & cells, panel["title"]
        cells |= mine


def test_the_seed_articles_four_and_the_pipeline_are_on_it() -> None:
    used = used_metrics()
    for name in (
        "sluice_queue_intents",  # queue_depth_pending
        "sluice_provider_success_ratio",  # provider_success_rate
        "sluice_sender_tokens_remaining",  # redis_token_bucket_remaining
        "sluice_queue_oldest_due_age_seconds",
        "sluice_router_results_total",
        "sluice_sends_total",
        "sluice_rpc_duration_seconds_bucket",
    ):
        assert name in used, name
    exprs = dashboard_exprs()
    assert any("sluice:cost_per_1k_sends:rate5m" in e for e in exprs)  # cost_per_1k_sends
    assert any("by (status, kind)" in e and "sluice_queue_intents" in e for e in exprs)
    assert any("by (provider, outcome)" in e for e in exprs)


def test_ingest_latency_is_p50_p95_p99_from_the_histogram() -> None:
    ingest = [e for e in dashboard_exprs() if 'service="ingest"' in e and "duration" in e]
    quantiles = sorted(
        float(m) for e in ingest for m in re.findall(r"histogram_quantile\(([\d.]+)", e)
    )
    assert quantiles == [0.5, 0.95, 0.99]
    for expr in dashboard_exprs():
        # An average of a latency hides the tail the percentiles are there to show.
        assert not re.search(r"avg[^(]*\([^)]*_seconds_(sum|count)", expr), expr
        assert "_seconds_bucket" not in expr or "histogram_quantile" in expr, expr
