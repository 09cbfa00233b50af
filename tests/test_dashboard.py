"""The Grafana dashboard in examples/grafana: its layout, its queries' names, and the
runbook's links to its panels. tests/test_inference_service.py evaluates every
query against a real Prometheus."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tests import dashboard

REPO_ROOT = Path(__file__).resolve().parent.parent
RUNBOOK = REPO_ROOT / "docs" / "runbook-gpu-memory-exhaustion.md"
METRICS_DOC = REPO_ROOT / "docs" / "metrics.md"
ALERTS = REPO_ROOT / "examples" / "prometheus" / "alerts.yml"
VARIABLES = {"job", "instance", "device"}


def test_panels_have_unique_ids_and_tile_the_grid_without_overlap() -> None:
    panels = dashboard.panels()
    assert len({panel["id"] for panel in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        place = panel["gridPos"]
        assert place["x"] + place["w"] <= 24, panel["title"]
        covered = {
            (x, y)
            for x in range(place["x"], place["x"] + place["w"])
            for y in range(place["y"], place["y"] + place["h"])
        }
        assert not covered & cells, f"{panel['title']} overlaps another panel"
        cells |= covered


def test_every_query_reads_the_imported_datasource_and_only_the_dashboards_variables() -> None:
    board = dashboard.load()
    assert [item["name"] for item in board["__inputs"]] == ["DS_PROMETHEUS"]
    assert {variable["name"] for variable in board["templating"]["list"]} == VARIABLES
    for panel in dashboard.panels():
        sources = [panel["datasource"]] + [target["datasource"] for target in panel["targets"]]
        assert all(source["uid"] == "${DS_PROMETHEUS}" for source in sources), panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(set(refs)) == len(refs) >= 1, panel["title"]
        for target in panel["targets"]:
            assert set(re.findall(r"\$(\w+)", target["expr"])) <= VARIABLES, target["expr"]


def test_every_metric_the_panels_query_is_a_documented_one() -> None:
    documented = set(re.findall(r"`(torchmemguard_\w+)`", METRICS_DOC.read_text()))
    for title, _, expr in dashboard.queries("job"):
        for name in re.findall(r"torchmemguard_\w+", expr):
            assert name in documented, f"{title}: {name} is not in docs/metrics.md"


def test_the_memory_panel_draws_the_alerts_threshold() -> None:
    rules = yaml.safe_load(ALERTS.read_text())["groups"]
    exprs = {rule["alert"]: rule["expr"] for group in rules for rule in group["rules"]}
    for alert in ("GPUMemoryExhaustion", "TorchMemGuardBudgetNearlyFull"):
        assert re.search(r">\s*0\.95\b", exprs[alert]), exprs[alert]
    memory = next(p for p in dashboard.panels() if p["title"] == "Memory used against the budget")
    steps = memory["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [step["value"] for step in steps] == [None, 0.95]
    assert memory["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] == "line"


def test_the_runbook_names_every_panel_and_only_panels_that_exist() -> None:
    named = set()
    # "Dashboard panel: *A*" or "dashboard panels: *A* (...), *B*", up to the sentence's end.
    for words in re.findall(
        r"dashboard panels?:(.*?)(?:\.\s|\n\n)", RUNBOOK.read_text(), re.S | re.I
    ):
        named |= set(re.findall(r"\*([^*]+)\*", words.replace("\n   ", " ").replace("\n", " ")))
    titles = {panel["title"] for panel in dashboard.panels()}
    assert named == titles
