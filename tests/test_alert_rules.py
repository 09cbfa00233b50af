"""The Prometheus alerting rules in examples/prometheus, and the Ray Serve example's scrape
configuration, checked by promtool.

``make test`` installs promtool first where it can (as root). Without promtool
these tests skip, except under CI (``CI=true``), where a check that is skipped
proves nothing, so they fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

RULES_DIR = Path(__file__).resolve().parent.parent / "examples" / "prometheus"
TIMEOUT_S = 120


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run promtool with ``args`` in the rules' directory, skipping if it is absent."""
    promtool = shutil.which("promtool")
    if promtool is None:
        reason = "promtool is not installed (apt-get install prometheus, or `make test` as root)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true, so the alert rules must be checked")
        pytest.skip(reason)
    return subprocess.run(
        [promtool, *args],
        cwd=RULES_DIR,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def test_alert_rules_pass_promtool_check() -> None:
    result = _promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_their_promtool_unit_tests() -> None:
    result = _promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_ray_serve_scrape_configuration_passes_promtool_check() -> None:
    result = _promtool("check", "config", "../ray_serve/prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
