"""Print every benchmark's results as Markdown, and plot them as PNG files.

Reads each ``benchmarks/results/*.json``. A results file may hold:

- ``"markdown"``: a Markdown table (and notes), printed as it is;
- ``"table"``: a Markdown string, printed as it is, or a list of rows (objects
  with the same keys), printed as a table; used where there is no ``"markdown"``;
- ``"plot"``: series to draw, ``{"title": ..., "xlabel": ..., "ylabel": ...,
  "x": [...], "series": {"name": [y, ...]}}`` (each name may instead map to
  ``{"x": [...], "y": [...]}``; ``"logy": true`` for a log scale), saved as
  ``<name>.png`` beside the file. Without ``"series"``, each key of ``"plot"``
  that maps names to lists of numbers is drawn as a panel of its own, against
  the index (``null`` leaves a gap).

The overhead results (``overhead*.json``) are drawn as bars of µs per call with
the interquartile range, one column per workload, in ``overhead*.png``.

    python -m benchmarks.report
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.results import RESULTS


def load(folder: Path = RESULTS) -> dict[str, dict[str, Any]]:
    """Every results file in ``folder`` that reads as a JSON object, by name."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.json")):
        try:
            results = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"Skipped {path}: {exc}", file=sys.stderr)
            continue
        if isinstance(results, dict):
            found[path.stem] = results
        else:
            print(f"Skipped {path}: not a JSON object", file=sys.stderr)
    return found


def table(results: dict[str, Any]) -> str | None:
    """The Markdown that a results file offers, if any."""
    for key in ("markdown", "table"):
        value = results.get(key)
        if isinstance(value, str) and value.strip():
            return value
    rows = results.get("table")
    if isinstance(rows, list) and rows and all(isinstance(row, dict) for row in rows):
        columns = list(dict.fromkeys(key for row in rows for key in row))
        lines = [
            "| " + " | ".join(map(str, columns)) + " |",
            "| " + " | ".join("---" for _ in columns) + " |",
        ]
        lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
        return "\n".join(lines) + "\n"
    return None


def environment_line(results: dict[str, Any]) -> str:
    env = results.get("environment")
    if not isinstance(env, dict):
        return "environment: not recorded"
    return "environment: " + ", ".join(f"{key} {value}" for key, value in env.items())


def plot_overhead(results: dict[str, Any], path: Path) -> None:
    """Bars of µs per call with IQR error bars, one column per workload.

    The top row holds every contender on a log scale; the bottom row leaves the
    peers out and uses a linear scale, where microseconds can be told apart.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = results["workloads"]
    figure, axes = plt.subplots(
        2, len(workloads), figsize=(6.5 * len(workloads), 10), squeeze=False
    )
    for column, (workload, entry) in enumerate(workloads.items()):
        everyone = entry["contenders"]
        ours = {n: row for n, row in everyone.items() if row["library"] in _COLOURS}
        _bars(axes[0][column], everyone, log=True)
        _bars(axes[1][column], ours, log=False)
        axes[0][column].set_title(f"{workload}: {entry.get('description', '')}", fontsize=9)
        axes[1][column].set_title(f"{workload}, without the peers (linear scale)", fontsize=9)
    figure.suptitle(
        f"Happy-path cost per call on {results.get('device', '?')}: median and IQR over "
        f"{results.get('rounds', '?')} interleaved rounds"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


_COLOURS = {"none": "0.55", "wrapt": "0.8", "torchmemguard": "tab:blue"}


def _bars(axis: Any, rows: dict[str, dict[str, Any]], log: bool) -> None:
    times = [row["us_per_call"] for row in rows.values()]
    medians = [t["median"] for t in times]
    errors = [[t["median"] - t["q1"] for t in times], [t["q3"] - t["median"] for t in times]]
    positions = list(range(len(rows)))
    colours = [_COLOURS.get(row["library"], "tab:orange") for row in rows.values()]
    axis.bar(positions, medians, yerr=errors, capsize=4, color=colours)
    for x, t in zip(positions, times, strict=True):
        label = f"{t['median']:,.2f}" if t["median"] < 100 else f"{t['median']:,.0f}"
        axis.annotate(
            label, (x, t["q3"]), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8
        )
    axis.set_xticks(positions, list(rows), rotation=25, ha="right", fontsize=8)
    if log:
        axis.set_yscale("log")
    axis.set_ylabel("µs per call" + (", log scale" if log else ""))


@dataclass
class _Panel:
    title: str
    xlabel: str
    ylabel: str
    logy: bool
    lines: list[tuple[str, list[Any], list[float]]]


def _numbers(values: object) -> list[float] | None:
    """``values`` as floats (None as a gap), or None if it is not a list of numbers."""
    if not isinstance(values, list) or not values:
        return None
    if not all(
        v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in values
    ):
        return None
    return [math.nan if v is None else float(v) for v in values]


def panels(spec: dict[str, Any]) -> list[_Panel]:
    """What a ``"plot"`` asks to draw.

    With ``"series"``, one panel as the module's docstring describes. Without it,
    one panel for each key that maps names to lists of numbers, against their index.
    """
    series = spec.get("series")
    if series is None:
        found = [p for key, value in spec.items() if (p := _mapped(str(key), value)) is not None]
        if not found:
            raise ValueError('"plot" has no "series", nor any names mapped to lists of numbers')
        return found
    if not isinstance(series, dict) or not series:
        raise ValueError('"plot": "series" must map names to values')
    lines = []
    for name, values in series.items():
        if isinstance(values, dict):
            xs, ys = values.get("x"), _numbers(values.get("y"))
        else:
            xs, ys = spec.get("x"), _numbers(values)
        if ys is None:
            raise ValueError(f"series {name!r} has no list of numbers")
        if not isinstance(xs, list):
            xs = list(range(len(ys)))
        if len(xs) != len(ys):
            raise ValueError(f"series {name!r}: {len(xs)} x values for {len(ys)} y values")
        lines.append((str(name), xs, ys))
    title, xlabel, ylabel = (str(spec.get(k, "")) for k in ("title", "xlabel", "ylabel"))
    return [_Panel(title, xlabel, ylabel, bool(spec.get("logy")), lines)]


def _mapped(key: str, value: object) -> _Panel | None:
    """A panel for ``{name: [numbers]}``, against the index; None for anything else."""
    if not isinstance(value, dict) or not value:
        return None
    lines: list[tuple[str, list[Any], list[float]]] = []
    for name, values in value.items():
        ys = _numbers(values)
        if ys is None:
            return None
        lines.append((str(name), list(range(len(ys))), ys))
    return _Panel(key, "index", key, False, lines)


def plot_series(spec: dict[str, Any], path: Path) -> None:
    """Draw the ``"plot"`` of a results file, one panel above the other."""
    found = panels(spec)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(found), 1, figsize=(8, 4 * len(found)), squeeze=False)
    for axis, panel in zip(axes[:, 0], found, strict=True):
        for name, xs, ys in panel.lines:
            axis.plot(xs, ys, marker="." if len(ys) > 30 else "o", label=name)
        if panel.logy:
            axis.set_yscale("log")
        axis.set_title(panel.title)
        axis.set_xlabel(panel.xlabel)
        axis.set_ylabel(panel.ylabel)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plots(found: dict[str, dict[str, Any]], folder: Path = RESULTS) -> list[str]:
    """Draw what can be drawn; return one line per picture written or skipped."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return ["No plots: matplotlib is not installed (pip install -e '.[bench]')."]
    said = []
    for name, results in found.items():
        for path, draw in _jobs(name, results, folder):
            try:
                draw(path)
            except (KeyError, TypeError, ValueError) as exc:
                said.append(f"Not plotted: {path.name} ({type(exc).__name__}: {exc})")
            else:
                said.append(f"Plot: {path}")
    return said


def _jobs(
    name: str, results: dict[str, Any], folder: Path
) -> list[tuple[Path, Callable[[Path], None]]]:
    """The pictures a results file gives: where each goes, and how to draw it."""
    jobs: list[tuple[Path, Callable[[Path], None]]] = []
    if name.startswith("overhead") and isinstance(results.get("workloads"), dict):
        jobs.append((folder / f"{name}.png", lambda path: plot_overhead(results, path)))
    spec = results.get("plot")
    if isinstance(spec, dict):
        target = folder / f"{name}-plot.png" if jobs else folder / f"{name}.png"
        jobs.append((target, lambda path: plot_series(spec, path)))
    return jobs


def main() -> int:
    found = load()
    if not found:
        print(f"No results in {RESULTS}: run the benchmarks first (make bench).", file=sys.stderr)
        return 1
    for name, results in found.items():
        print(f"## {name}\n")
        print(environment_line(results) + "\n")
        print(table(results) or "(this results file holds no table)\n")
    for line in plots(found):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
