"""deploy/prometheus/rules.yml: promtool accepts it, and its unit tests (rules_test.yml)
make every alert fire once and show it silent in a near miss."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.deploy.monitoring import (
    RULES,
    RULES_TEST,
    dashboard_exprs,
    load_yaml,
    metric_names,
    need_binary,
    rules,
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [need_binary("promtool"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=RULES.parent,
    )


def test_promtool_checks_the_rules() -> None:
    out = promtool("check", "rules", RULES.name)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules())} rules found" in out.stdout


def test_promtool_unit_tests_pass() -> None:
    out = promtool("test", "rules", RULES_TEST.name)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_alert_is_made_to_fire_and_shown_silent() -> None:
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    assert alerts == {
        "SluiceQueueDepthHigh",
        "SluiceProviderSuccessRateLow",
        "SluiceDueIntentsPastDeadlineBudget",
        "SluiceLimiterStarved",
        "SluiceNoSendsWhileDue",
    }
    fired: set[str] = set()
    silent: set[str] = set()
    for case in load_yaml(RULES_TEST)["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check["exp_alerts"] else silent).add(check["alertname"])
    assert fired == alerts
    assert silent == alerts


def test_every_alert_says_what_to_do() -> None:
    for rule in rules():
        if "alert" in rule:
            assert rule["labels"]["severity"] in ("page", "warning"), rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]
            assert len(rule["annotations"]["description"]) > 40, rule["alert"]


def test_the_dashboard_queries_parse(tmp_path: Path) -> None:
    # promtool has no offline PromQL check of its own, so each panel query goes in as a
    # recording rule; a typo in a panel fails here, not in front of an operator.
    groups = [
        {
            "name": "dashboard",
            "rules": [
                {"record": f"dashboard:q{i}", "expr": e} for i, e in enumerate(dashboard_exprs())
            ],
        }
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps({"groups": groups}), encoding="utf-8")
    out = promtool("check", "rules", str(path))
    assert out.returncode == 0, out.stdout + out.stderr


def test_metric_names_ignore_labels_and_strings() -> None:
    expr = (
        'sum by (provider, sluice_x) (rate(sluice_sends_total{kind="sluice_fake"}[5m]))'
        " / on (kind) sluice:sends:rate5m"
    )
    assert metric_names(expr) == {"sluice_sends_total", "sluice:sends:rate5m"}
