"""The shipped Grafana dashboard, read as its panels and their queries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parent.parent / "examples" / "grafana" / "torchmemguard.json"


def load() -> dict[str, Any]:
    board: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return board


def panels() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = load()["panels"]
    return found


def queries(job: str) -> list[tuple[str, str, str]]:
    """Every panel query as (panel title, refId, PromQL), with the dashboard's variables
    set to ``job`` and to every instance and device, as Grafana sends them."""
    values = {"$job": job, "$instance": ".*", "$device": ".*"}
    found = []
    for panel in panels():
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in values.items():
                expr = expr.replace(name, value)
            found.append((panel["title"], target["refId"], expr))
    return found
