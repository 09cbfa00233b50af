"""Write docs/benchmarks.md from the benchmarks' result files, and plot them as PNG files.

Reads each ``benchmarks/results/*.json`` and writes one section per file: the
environment and settings recorded in it, its tables, and its plot where one is
drawn. A results file may hold:

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

    python -m benchmarks.report [--results DIR] [--output FILE | --output -] [--no-plots]

``make bench`` runs it after the benchmarks. Run alone, it regenerates the
document from the result files as they are; tests/test_benchmark_report.py
checks that the committed document matches them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.results import RESULTS

DOCUMENT = RESULTS.parent.parent / "docs" / "benchmarks.md"

# Section titles and their order in the document; other results files follow.
_TITLES = {
    "recovery": "Recovery under a real memory cap",
    "overhead": "Cost on the happy path",
    "scrape": "Scrape cost",
    "training": "Training under a real memory cap",
    "lifetimes": "A long-lived guard and a fresh guard per call under a real memory cap",
    "batching": "Batching single requests under a real memory cap",
}
# What a reader should know of a benchmark's method beyond its own text ({folder}:
# the link to the benchmarks' folder).
_METHOD = {
    "recovery": (
        "Each peer is called as its documentation shows, with the smallest "
        "adapter a user would write ([`benchmarks/recovery_child.py`]"
        "({folder}/recovery_child.py)). The oracle knows, for each length, the largest chunk "
        "that holds through the stream under the same cap, found beforehand: bisected in "
        "a fork, then shrunk by 10% after each OOM in fresh streams of its own, until "
        "three streams in a row ran without one."
    ),
    "training": (
        "accelerate's `find_executable_batch_size` wraps a step that accumulates over "
        "micro-batches of its `batch_size`, as its documentation shows "
        "([`benchmarks/training.py`]({folder}/training.py)). The oracle accumulates over "
        "micro-batches of the largest size that runs every step in each of three fresh "
        "processes, found beforehand by bisection."
    ),
    "batching": (
        "The fixed-size batcher stands in for Ray Serve's `@serve.batch` and the other "
        "batchers set by hand: it groups requests by length, as the Batcher does, so that "
        "the two differ only in how a batch's size is chosen "
        "([`benchmarks/batching.py`]({folder}/batching.py))."
    ),
}
# Keys of a results file that are its measurements or its text, not its settings.
_NOT_SETTINGS = {"environment", "benchmark", "summary_line", "markdown", "table", "plot", "notes"}


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


def recorded(results: dict[str, Any]) -> str:
    """A table of the environment and settings that a results file records."""
    env = results.get("environment")
    rows: list[tuple[str, str]] = []
    if isinstance(env, dict):
        rows.append(("date", _value(env["date"]) if "date" in env else "not recorded"))
        rows += [(str(key), _value(value)) for key, value in env.items() if key != "date"]
    else:
        rows.append(("environment", "not recorded"))
    for key, value in results.items():
        if key == "setup" and isinstance(value, dict):
            rows += [(f"setup.{k}", _value(v)) for k, v in value.items() if _is_setting(v)]
        elif key not in _NOT_SETTINGS and _is_setting(value):
            rows.append((str(key), _value(value)))
    lines = ["| recorded | value |", "| --- | --- |"]
    lines += [f"| `{key}` | {_cell(text)} |" for key, text in rows]
    return "\n".join(lines) + "\n"


def _is_scalar(value: object) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _is_setting(value: object) -> bool:
    """A scalar, or a short list or mapping of scalars: not a series of measurements."""
    if isinstance(value, list):
        return len(value) <= 8 and all(map(_is_scalar, value))
    if isinstance(value, dict):
        return len(value) <= 8 and all(map(_is_scalar, value.values()))
    return _is_scalar(value)


def _value(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(map(_value, value))
    if isinstance(value, dict):
        return ", ".join(f"{k} {_value(v)}" for k, v in value.items())
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


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


def title(name: str) -> str:
    """The section title of results file ``name`` (``overhead-gpu``: "... (gpu)")."""
    base, _, variant = name.partition("-")
    found = _TITLES.get(base, name)
    return f"{found} ({variant})" if variant and base in _TITLES else found


def _order(name: str) -> tuple[int, str]:
    base = name.partition("-")[0]
    return (list(_TITLES).index(base) if base in _TITLES else len(_TITLES), name)


def _link(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


def render(found: dict[str, dict[str, Any]], folder: Path, document: Path) -> str:
    """The Markdown document of ``found``, read from ``folder``, to be written at ``document``.

    Links are relative to the document's folder, and paths in the text to the
    folder above it (the repository, for docs/benchmarks.md).
    """
    here = document.parent
    shown = _link(folder, here.parent)
    parts = [
        "<!-- Generated by `python -m benchmarks.report` from the result files: "
        "do not edit; regenerate it. -->\n",
        "# Benchmarks\n",
        f"This file is generated by `python -m benchmarks.report` from the result files in "
        f"[`{shown}/`]({_link(folder, here)}/): do not edit it by hand. "
        "To regenerate it from the result files as they are, run "
        "`.venv/bin/python -m benchmarks.report`. To measure again, run `make bench`: it "
        "installs the `bench` extra (accelerate, toma, torch-max-mem, matplotlib, tqdm), "
        f"runs every benchmark, rewrites `{shown}/<name>.json` with the environment it ran "
        "in, redraws the plots and regenerates this file. `tests/test_benchmark_report.py` "
        "fails when this file and the result files disagree.\n",
        "Each section gives the environment and settings recorded in its result file, "
        "then the tables that the benchmark wrote. Timings depend on the machine and "
        "drift from run to run: read the quartiles in brackets, not only the medians.\n",
    ]
    for name in sorted(found, key=_order):
        results = found[name]
        parts.append(f"## {title(name)}\n")
        base = name.partition("-")[0]
        source = folder.parent / f"{base}.py"
        said = f"From [`{name}.json`]({_link(folder / f'{name}.json', here)})"
        if source.exists():
            said += (
                f", written by `python -m benchmarks.{base}`; the docstring of "
                f"[`{_link(source, here.parent)}`]({_link(source, here)}) says how it measures"
            )
        parts.append(said + ".\n")
        if base in _METHOD:
            parts.append(_METHOD[base].format(folder=_link(folder.parent, here)) + "\n")
        parts.append(recorded(results))
        parts.append((table(results) or "(this results file holds no table)").strip() + "\n")
        for path, _ in _jobs(name, results, folder):
            if path.exists():
                parts.append(f"![{title(name)}]({_link(path, here)})\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report",
        description="Write docs/benchmarks.md from benchmarks/results/*.json and draw the plots.",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="the result files' folder")
    parser.add_argument(
        "--output",
        default=str(DOCUMENT),
        help="the Markdown file to write (default: docs/benchmarks.md); - prints it",
    )
    parser.add_argument(
        "--no-plots", action="store_true", help="leave the PNG files as they are; draw nothing"
    )
    args = parser.parse_args(argv)
    folder: Path = args.results
    to_stdout = args.output == "-"
    document = DOCUMENT if to_stdout else Path(args.output)
    found = load(folder)
    if not found:
        print(f"No results in {folder}: run the benchmarks first (make bench).", file=sys.stderr)
        return 1
    said = sys.stderr if to_stdout else sys.stdout
    if not args.no_plots:
        for line in plots(found, folder):
            print(line, file=said)
    text = render(found, folder, document)
    if to_stdout:
        sys.stdout.write(text)
    else:
        document.parent.mkdir(parents=True, exist_ok=True)
        document.write_text(text)
        print(f"Wrote {document}", file=said)
    return 0


if __name__ == "__main__":
    sys.exit(main())
