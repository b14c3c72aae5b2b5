"""What the monitoring files under deploy/ use: the PromQL of the Grafana dashboard and of
the Prometheus rules, and the metric names in it. Shared by the static tests and the
end-to-end test against a real Prometheus, so adding a panel or a rule adds its checks."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "sluice-pipeline.json"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "rules_test.yml"

# Grafana's variables, replaced by what they stand for in a plain query.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$provider": ".*"}
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_MATCHERS = re.compile(r"\{[^}]*\}")
_NAMES = re.compile(r"\b(sluice[_:][A-Za-z0-9_:]*)")


def load_yaml(path: Path) -> Any:
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the rules")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def dashboard_panels() -> Iterator[dict[str, Any]]:
    for panel in dashboard()["panels"]:
        yield from panel.get("panels", [])
        if panel["type"] != "row":
            yield panel


def dashboard_exprs() -> list[str]:
    """Every panel query, with Grafana's variables replaced, in panel order."""
    exprs = []
    for panel in dashboard_panels():
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            exprs.append(expr)
    return exprs


def rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(RULES)["groups"] for rule in group["rules"]]


def recorded_names() -> set[str]:
    return {rule["record"] for rule in rules() if "record" in rule}


def metric_names(expr: str) -> set[str]:
    """The Sluice metric names an expression reads (string literals, label lists and
    matchers taken out first, so label names and values are never mistaken for one)."""
    bare = _MATCHERS.sub(" ", _LABEL_LISTS.sub(" ", _STRINGS.sub('""', expr)))
    return set(_NAMES.findall(bare))


def used_metrics() -> set[str]:
    """Every exported metric (not a recorded one) the dashboard and the rules read."""
    names: set[str] = set()
    for expr in [*dashboard_exprs(), *(rule["expr"] for rule in rules())]:
        names |= metric_names(expr)
    return names - recorded_names()


def used_recordings() -> set[str]:
    """Recorded series the dashboard and the alerts read."""
    names: set[str] = set()
    for expr in [*dashboard_exprs(), *(rule["expr"] for rule in rules())]:
        names |= metric_names(expr)
    return names & recorded_names()


def need_binary(name: str, install: str = "apt-get install prometheus") -> str:
    """The path of a tool the test needs (on PATH or in this virtualenv): in CI a missing one
    fails the test (CI installs it, see .ci/run), elsewhere it skips saying how to get it."""
    # This virtualenv's first: a tool pinned in uv.lock beats whatever the machine has.
    for candidate in (str(Path(sys.prefix) / "bin" / name), shutil.which(name)):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    message = f"{name} is not installed ({install}; .ci/run does it)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


PROMETHEUS_RULE = ROOT / "deploy" / "k8s" / "components" / "monitoring" / "prometheusrule.yaml"
_RULE_HEADER = """\
# Generated from deploy/prometheus/rules.yml: edit that file, then run
#   .venv/bin/python -m tests.deploy.monitoring
# (tests/deploy/test_k8s_manifests.py fails while the two differ).
"""


def prometheus_rule() -> dict[str, Any]:
    """The PrometheusRule (Prometheus Operator) carrying deploy/prometheus/rules.yml."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "sluice",
            "namespace": "sluice",
            "labels": {"app.kubernetes.io/name": "sluice", "app.kubernetes.io/part-of": "sluice"},
        },
        "spec": {"groups": load_yaml(RULES)["groups"]},
    }


def prometheus_rule_text() -> str:
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed to write the rules")
    body: str = yaml.safe_dump(prometheus_rule(), sort_keys=False, width=100, allow_unicode=True)
    return _RULE_HEADER + body


if __name__ == "__main__":
    PROMETHEUS_RULE.write_text(prometheus_rule_text(), encoding="utf-8")
    print(f"wrote {PROMETHEUS_RULE.relative_to(ROOT)}")
