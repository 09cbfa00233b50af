"""The README stays a first read; the reference in docs/ covers the public API and metrics,
and every link between them leads somewhere."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

import torchmemguard
from torchmemguard._observability.collectors import GpuCollector

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
REFERENCE = ("guide.md", "metrics.md")


def _anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)
    return {_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.MULTILINE)}


def test_readme_is_at_most_ten_kilobytes() -> None:
    assert len(README.read_bytes()) <= 10 * 1024


def test_readme_links_to_every_reference_document() -> None:
    text = README.read_text()
    for name in (*REFERENCE, "benchmarks.md", "runbook-gpu-memory-exhaustion.md"):
        assert f"](docs/{name})" in text, name


@pytest.mark.parametrize("path", [README, *sorted(DOCS.glob("*.md"))], ids=lambda path: path.name)
def test_links_lead_to_files_and_headings_that_exist(path: Path) -> None:
    links = re.findall(r"\]\(([^)\s]+)\)", path.read_text())
    assert links
    for link in links:
        if link.startswith("http"):
            continue
        target, _, anchor = link.partition("#")
        found = (path.parent / target).resolve() if target else path
        assert found.exists(), link
        if anchor and found.suffix == ".md":
            assert anchor in _anchors(found), link


def test_every_public_name_is_in_the_reference() -> None:
    text = "".join((DOCS / name).read_text() for name in REFERENCE)
    missing = [
        name
        for name in torchmemguard.__all__
        if not re.search(rf"`(torchmemguard\.)?{name}\b", text)
    ]
    assert not missing


def test_every_metric_is_in_the_metrics_document() -> None:
    registry = CollectorRegistry()
    torchmemguard.install_metrics(registry)
    families = [*registry.collect(), *GpuCollector().describe()]
    names = {f"{f.name}_total" if f.type == "counter" else f.name for f in families}
    assert len(names) > 10
    text = (DOCS / "metrics.md").read_text()
    assert not [name for name in sorted(names) if f"`{name}`" not in text]


def test_every_alert_rule_is_in_the_metrics_document() -> None:
    rules = (ROOT / "examples" / "prometheus" / "alerts.yml").read_text()
    alerts = re.findall(r"^\s*- alert: (\w+)$", rules, flags=re.MULTILINE)
    assert len(alerts) == 5
    text = (DOCS / "metrics.md").read_text()
    assert not [alert for alert in alerts if f"`{alert}`" not in text]


def _named_modules() -> set[str]:
    """The files and folders that docs/architecture.md's module tables name."""
    text = (DOCS / "architecture.md").read_text()
    tables = text[text.index("## Modules") : text.index("## One guarded call")]
    return set(re.findall(r"^\| `([\w/.]+)` \|", tables, flags=re.MULTILINE))


def test_the_architecture_names_exactly_the_modules_that_exist() -> None:
    package = ROOT / "torchmemguard"
    found = {str(p.relative_to(package)) for p in package.rglob("*.py")}
    found |= {f"{p.name}/" for p in package.iterdir() if (p / "__init__.py").exists()}
    # A subpackage's __init__.py that holds only its docstring has no job of its own.
    found -= {
        name
        for name in list(found)
        if name.endswith("/__init__.py") and len(ast.parse((package / name).read_text()).body) == 1
    }
    assert _named_modules() == found
