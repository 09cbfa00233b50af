"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest
import torch


def rows(n: int, width: int = 3) -> torch.Tensor:
    """``n`` samples whose first column is the sample's index."""
    x = torch.zeros(n, width)
    x[:, 0] = torch.arange(n, dtype=torch.float32)
    return x


class ChunkLimit:
    """A per-sample function that runs out of memory above ``limit`` samples.

    It records the size of every attempt, and the rows it computed in attempts
    that succeeded, so tests can check the exact sequence of chunk sizes and
    that no sample is computed twice or dropped.
    """

    def __init__(self, limit: int, message: str = "CUDA out of memory.") -> None:
        self.limit = limit
        self.message = message
        self.sizes: list[int] = []
        self.rows: list[int] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(
                f"{self.message} Tried to allocate {x.shape[0]} samples; limit {self.limit}"
            )
        self.rows.extend(int(v) for v in (x[:, 0] if x.dim() > 1 else x))
        return x * 2 + 1


@pytest.fixture
def recoveries(monkeypatch: pytest.MonkeyPatch) -> list[tuple[object, bool]]:
    """Record each recovery that the guard performs (device, full collection)."""
    from torchmemguard import device

    calls: list[tuple[object, bool]] = []
    real = device.recover

    def record(dev: torch.device | None, seen: int, collect: bool = False) -> None:
        calls.append((dev, collect))
        real(dev, seen, collect)

    monkeypatch.setattr(device, "recover", record)
    return calls
