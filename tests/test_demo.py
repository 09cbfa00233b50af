"""examples/demo.py: a progress bar on a terminal, plain lines in a pipe or a log."""

from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path
from types import ModuleType

import pytest
from tqdm import tqdm

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.py"


@pytest.fixture(scope="module")
def demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("demo", DEMO)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _serve(demo: ModuleType, requests: int) -> None:
    with demo.progress(requests) as bar:
        for done in range(requests):
            bar.set_postfix(ooms_caught=done // 50)
            bar.update()


def test_progress_in_a_pipe_prints_a_plain_line_every_30_requests(
    demo: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    _serve(demo, 150)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [line.split(" requests")[0] for line in lines] == [
        f"With the guard: {n:>3}/150" for n in (30, 60, 90, 120, 150)
    ]
    assert lines[-1].endswith("out-of-memory errors caught so far: 2")


def test_progress_in_a_pipe_reports_the_last_request_too(
    demo: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    _serve(demo, 31)
    assert [line.split(" requests")[0] for line in out.getvalue().splitlines()] == [
        "With the guard: 30/31",
        "With the guard: 31/31",
    ]


def test_progress_on_a_terminal_is_a_bar(demo: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdout", _Terminal())
    monkeypatch.setattr(tqdm, "monitor_interval", 0)  # no monitor thread left behind
    with demo.progress(3) as bar:
        assert isinstance(bar, tqdm)
