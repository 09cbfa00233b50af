"""The GPU suite: every test here is marked ``cuda`` and skipped where CUDA is absent.

The tests are plain functions without fixtures, so that ``tests/gpu/check.py``
(``make gpu-check``) can also run them on a GPU machine that has no pytest.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="no CUDA device: run `make gpu-check` on a GPU machine")
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(pytest.mark.cuda)
            if not torch.cuda.is_available():
                item.add_marker(skip)
