"""deploy/monitoring: rules and dashboard name real metrics, Grafana loads it, promtool passes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from scripts.gen_docs import slug
from tests.support.stack import ROOT

MONITORING = ROOT / "deploy" / "monitoring"
PROMETHEUS_CONFIG = MONITORING / "prometheus.yml"
RULES = MONITORING / "rules" / "taskdock.yml"
RULE_TESTS = MONITORING / "rules" / "taskdock.test.yml"
GRAFANA = MONITORING / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "taskdock.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "taskdock.yml"
CHECK_SCRIPT = ROOT / "scripts" / "check-monitoring.sh"
# Where every alert's runbook annotation points (its entries are the page's "## " headings).
RUNBOOK = "docs/troubleshooting.md"
CONTAINER_RULES_DIR = "/etc/prometheus/rules/"

# A whole identifier: recording rule names (level:metric:operations) are not metric names.
METRIC = re.compile(r"(?<![\w:])taskdock_[a-z_]+(?![\w:])")
RECORDED = re.compile(r"(?<![\w:])[a-z_]+:[a-z0-9_:]+")
SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(RULES)["groups"] for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_exprs() -> list[str]:
    model = dashboard()
    exprs = [target["expr"] for panel in model["panels"] for target in panel.get("targets", [])]
    queries = [var.get("query", "") for var in model["templating"]["list"]]
    exprs += [query if isinstance(query, str) else query.get("query", "") for query in queries]
    return exprs


def rule_exprs() -> list[str]:
    return [rule["expr"] for rule in rules()]


SOURCES = [("rules", rule_exprs), ("dashboard", dashboard_exprs)]


def exposed_families() -> dict[str, str]:
    """Every metric family taskdock registers, by name, with its type."""
    from prometheus_client.metrics import MetricWrapperBase

    from app.api.metrics import StateCollector
    from app.core import metrics

    families = {
        obj._name: obj._type for obj in vars(metrics).values() if isinstance(obj, MetricWrapperBase)
    }
    # The gauges the API reads from the database and the broker at scrape time.
    collector = StateCollector(celery_app=None, settings=None)  # type: ignore[arg-type]
    collector._read_database = lambda: (0, {}, [], (0, 0, 0, 0))  # type: ignore[method-assign]
    collector._read_broker = lambda: {}  # type: ignore[method-assign]
    families.update({family.name: family.type for family in collector.collect()})
    return families


def exposed_samples() -> set[str]:
    """The names of the samples a scrape can carry."""
    return {
        name + suffix
        for name, kind in exposed_families().items()
        for suffix in SAMPLE_SUFFIXES[kind]
    }


def test_the_registry_is_read() -> None:
    families = exposed_families()

    assert families["taskdock_http_requests"] == "counter"
    assert families["taskdock_outbox_tasks"] == "gauge"
    assert families["taskdock_queue_depth"] == "gauge"
    assert "taskdock_task_run_seconds_bucket" in exposed_samples()
    assert "taskdock_http_requests" not in exposed_samples()


@pytest.mark.parametrize(("source", "exprs"), SOURCES)
def test_every_metric_named_is_exposed(source: str, exprs: Any) -> None:
    used = {name for expr in exprs() for name in METRIC.findall(expr)}

    assert used, f"no taskdock metric found in the {source}"
    assert used - exposed_samples() == set(), f"the {source} name metrics taskdock does not expose"


@pytest.mark.parametrize(("source", "exprs"), SOURCES)
def test_every_recorded_series_used_is_recorded(source: str, exprs: Any) -> None:
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    used = {name for expr in exprs() for name in RECORDED.findall(expr)}

    assert used - recorded == set(), f"the {source} use recording rules that do not exist"


def test_every_metric_has_a_panel() -> None:
    on_dashboard = {name for expr in dashboard_exprs() for name in METRIC.findall(expr)}
    on_dashboard |= {  # through the recording rules the dashboard shows
        name
        for rule in rules()
        if "record" in rule and any(rule["record"] in expr for expr in dashboard_exprs())
        for name in METRIC.findall(rule["expr"])
    }
    shown = {
        family
        for family, kind in exposed_families().items()
        for suffix in SAMPLE_SUFFIXES[kind]
        if family + suffix in on_dashboard
    }

    assert set(exposed_families()) - shown == set()


def test_alerts_are_actionable() -> None:
    troubleshooting = (ROOT / RUNBOOK).read_text()
    entries = {slug(heading) for heading in re.findall(r"^## (.+)$", troubleshooting, flags=re.M)}

    assert {alert["alert"] for alert in alerts()} >= {
        "TaskdockApiDown",
        "TaskdockNoWorkerUp",
        "TaskdockHighErrorRate",
        "TaskdockHighLatency",
        "TaskdockQueueBacklogGrowing",
        "TaskdockOutboxNotDraining",
        "TaskdockDatabaseDown",
        "TaskdockTaskFailureRatioHigh",
    }
    for alert in alerts():
        name = alert["alert"]
        assert alert.get("for"), name
        assert alert["labels"]["severity"] in {"critical", "warning"}, name
        assert alert["annotations"]["summary"], name
        assert alert["annotations"]["description"], name
        runbook = alert["annotations"]["runbook"]
        # "docs/troubleshooting.md#a-task-stays-queued (step 2)": the page, and an entry on it.
        found = re.fullmatch(rf"{re.escape(RUNBOOK)}(?:#([\w-]+))?(?: \(.+\))?", runbook)
        assert found, f"{name}: runbook {runbook!r} is not {RUNBOOK}[#entry][ (step)]"
        if found.group(1):
            assert found.group(1) in entries, f"{name}: {RUNBOOK} has no entry #{found.group(1)}"


def test_every_alert_has_a_unit_test() -> None:
    tested = {
        case["alertname"]
        for group in load_yaml(RULE_TESTS)["tests"]
        for case in group.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }

    assert {alert["alert"] for alert in alerts()} - tested == set()


def scrape_jobs(config: dict[str, Any]) -> set[str]:
    return {job["job_name"] for job in config["scrape_configs"]}


def test_rules_select_the_scraped_jobs() -> None:
    selected = {job for expr in rule_exprs() for job in re.findall(r'job="([^"]+)"', expr)}

    assert selected
    assert selected <= scrape_jobs(load_yaml(PROMETHEUS_CONFIG))


def test_rule_files_are_the_repository_rules() -> None:
    config = load_yaml(PROMETHEUS_CONFIG)

    assert config["rule_files"]
    for entry in config["rule_files"]:
        assert entry.startswith(CONTAINER_RULES_DIR)
        matches = list(RULES.parent.glob(entry.removeprefix(CONTAINER_RULES_DIR)))
        # Not a glob over the directory: it would load the unit tests as rules.
        assert matches == [RULES]


def kubernetes_example() -> list[dict[str, Any]]:
    text = PROMETHEUS_CONFIG.read_text()
    block = text.split("# --- kubernetes example: begin\n", 1)[1]
    block = block.split("# --- kubernetes example: end", 1)[0]
    jobs: list[dict[str, Any]] = yaml.safe_load(
        "\n".join(line.removeprefix("#") for line in block.splitlines())
    )
    return jobs


def test_kubernetes_example_keeps_the_job_names() -> None:
    jobs = scrape_jobs(load_yaml(PROMETHEUS_CONFIG))

    assert {job["job_name"] for job in kubernetes_example()} == jobs - {"prometheus"}


# Grafana


def provisioned_uids() -> set[str]:
    return {source["uid"] for source in load_yaml(DATASOURCES)["datasources"]}


def test_dashboard_model() -> None:
    model = dashboard()
    ids = [panel["id"] for panel in model["panels"]]

    assert model["uid"]
    assert model["title"]
    assert model["schemaVersion"] >= 36
    assert len(ids) == len(set(ids))
    assert "instance=" not in json.dumps(dashboard_exprs())  # no hard-coded hosts


def test_panels_use_the_provisioned_data_source() -> None:
    uids = provisioned_uids()
    panels = [panel for panel in dashboard()["panels"] if panel["type"] != "row"]

    assert panels
    for panel in panels:
        assert panel["datasource"]["uid"] in uids, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] in uids, panel["title"]
            assert target["expr"].strip(), panel["title"]


def cells(panel: dict[str, Any]) -> Iterator[tuple[int, int]]:
    grid = panel["gridPos"]
    for x in range(grid["x"], grid["x"] + grid["w"]):
        for y in range(grid["y"], grid["y"] + grid["h"]):
            yield x, y


def test_panels_do_not_overlap() -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in dashboard()["panels"]:
        grid = panel["gridPos"]
        assert min(grid["w"], grid["h"], grid["x"] + 1) > 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for cell in cells(panel):
            assert cell not in taken, f"{panel['title']} overlaps {taken[cell]}"
            taken[cell] = panel["title"]


def test_dashboards_are_provisioned_from_the_mounted_folder() -> None:
    (provider,) = load_yaml(DASHBOARD_PROVIDERS)["providers"]

    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert DASHBOARD in DASHBOARD.parent.glob("*.json")


# promtool


@pytest.fixture
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        reason = "promtool is not installed: scripts/check-monitoring.sh installs it"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI must run it before the tests)")
        pytest.skip(reason)
    return path


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(arg) for arg in args], capture_output=True, text=True, timeout=120, check=False
    )


def test_check_script_passes(promtool: str) -> None:
    result = run("bash", CHECK_SCRIPT)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_kubernetes_example_is_valid(promtool: str, tmp_path: Path) -> None:
    # Debian builds promtool without Kubernetes discovery ("field kubernetes_sd_configs not
    # found"): check the jobs and their relabelling with a static target in its place.
    jobs = kubernetes_example()
    for job in jobs:
        assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
        job["static_configs"] = [{"targets": ["10.0.0.1:8000"]}]
    config = load_yaml(PROMETHEUS_CONFIG)
    config["rule_files"] = [str(RULES)]
    config["scrape_configs"] = jobs
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))

    result = run(promtool, "check", "config", tmp_path / "prometheus.yml")

    assert result.returncode == 0, result.stdout + result.stderr


def test_unit_tests_catch_a_broken_alert(promtool: str, tmp_path: Path) -> None:
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    broken = RULES.read_text().replace("ratio_rate5m > 0.05", "ratio_rate5m > 0.5")
    assert broken != RULES.read_text()
    (tmp_path / RULES.name).write_text(broken)

    result = run(promtool, "test", "rules", tmp_path / RULE_TESTS.name)

    assert result.returncode != 0
    assert "TaskdockHighErrorRate" in result.stdout + result.stderr
