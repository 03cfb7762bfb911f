"""Issue 12, item 4: the chart's Grafana dashboard, rendered with Helm: off by default, the
sidecar's label, and every panel's query names only metrics the operator exports."""

from __future__ import annotations

import json
import re

from prometheus_client import REGISTRY

from .render import by_kind, one, template_text
from .test_chart import objects

#: The panels issue 12 asks for, by a word of their title.
REQUIRED_PANELS = ("phase", "progress", "goodput", "preemptions", "lost work", "snapshot age", "save seconds")
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "summary": ("_sum", "_count", "_created"), "info": ("_info",)}


def exported_metric_names() -> set[str]:
    """Every series name the operator's registry can expose (read from it, not from a list)."""
    import trainingjob_operator.metrics  # noqa: F401 - registers the operator's metrics

    names: set[str] = set()
    for family in REGISTRY.collect():
        names.add(family.name)
        names.update(family.name + s for s in _SUFFIXES.get(family.type, ()))
        names.update(s.name for s in family.samples)
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions,
    label names (in ``{}`` or ``by (...)``), ranges, variables or string literals."""
    text = re.sub(r'"[^"]*"', "", expr)
    text = re.sub(r"label_values\(([^,]*),\s*\w+\s*\)", r"\1", text)  # Grafana's: the 2nd argument is a label
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\$\w+", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    return {m.group(1) for m in re.finditer(r"\b([A-Za-z_:][A-Za-z0-9_:]*)\b(?!\s*\()", text)
            if m.group(1) not in ("and", "or", "unless", "bool", "offset")}


def dashboard(mode: str = "full") -> dict:
    cm = one([d for d in objects(mode) if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")],
             "ConfigMap")
    return json.loads(cm["data"]["trainingjobs.json"])


def test_issue12_item4_dashboard_is_off_by_default():
    assert not [d for d in by_kind(objects("default"), "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]


def test_issue12_item4_dashboard_configmap_has_the_sidecar_label_and_is_configurable():
    cm = [d for d in objects("full") if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]
    assert len(cm) == 1
    assert cm[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm[0]["metadata"]["annotations"] == {"grafana_folder": "Training"}
    proc = template_text(sets=["metrics.grafanaDashboard.enabled=true", "metrics.grafanaDashboard.labelKey=dash",
                               "metrics.grafanaDashboard.labelValue=yes", "metrics.grafanaDashboard.namespace=monitoring"])
    assert "dash: \"yes\"" in proc.stdout and "namespace: monitoring" in proc.stdout
    proc = template_text(sets=["metrics.grafanaDashboard.enabled=true", "metrics.enabled=false"], check=False)
    assert proc.returncode != 0 and "metrics.grafanaDashboard.enabled needs metrics.enabled" in proc.stderr


def test_issue12_item4_every_panel_query_names_a_metric_the_operator_exports():
    exported = exported_metric_names()
    assert "trainingjob_goodput_percent" in exported and "trainingjob_preemptions_total" in exported
    dash = dashboard()
    queries = [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]
    queries += [(f"variable {v['name']}", v["query"]["query"]) for v in dash["templating"]["list"]
                if v["type"] == "query"]
    for title, expr in queries:
        names = metric_names(expr)
        assert names, f"{title}: {expr!r} names no metric"
        assert names <= exported, f"{title}: {expr!r} names {sorted(names - exported)}, not exported by the operator"
    for panel in dash["panels"]:
        assert panel["targets"], f"panel {panel['title']} has no query"


def test_issue12_item4_dashboard_has_the_panels_the_issue_names():
    titles = [p["title"].lower() for p in dashboard()["panels"]]
    for want in REQUIRED_PANELS:
        assert any(want in t for t in titles), f"no panel for {want!r}: {titles}"
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))


def test_issue12_item4_metric_name_parser_sees_what_it_must():
    assert metric_names('time() - trainingjob_latest_snapshot_timestamp_seconds{job=~"$job"}') == \
        {"trainingjob_latest_snapshot_timestamp_seconds"}
    assert metric_names("sum by (phase) (trainingjob_jobs)") == {"trainingjob_jobs"}
    assert metric_names('label_values(trainingjob_job_phase{namespace=~"$namespace"}, job)') == {"trainingjob_job_phase"}
    assert metric_names('increase(trainingjob_preemptions_total{a="b"}[1h]) / not_ours') == \
        {"trainingjob_preemptions_total", "not_ours"}
