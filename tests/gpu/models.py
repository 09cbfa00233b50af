"""What the GPU tests share: a model whose activations, not weights, fill memory, and the
post-mortems logged meanwhile."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

MIB = 2**20
WIDTH, HIDDEN = 1024, 16384  # 64 KiB of activations per sample in the hidden layer


def wide_mlp() -> torch.nn.Module:
    """128 MiB of weights on the current CUDA device, in eval mode, fixed seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(WIDTH, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, WIDTH)
        )
    return model.cuda().eval()


def batch(n: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, WIDTH, generator=generator).cuda()


def reference(model: torch.nn.Module, x: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """The unguarded answer, computed in chunks small enough to fit anywhere."""
    with torch.inference_mode():
        return torch.cat([model(part) for part in x.split(chunk)])


def headroom_cap(extra_mib: int) -> int:
    """A cap ``extra_mib`` above what the allocator holds now (what the cap counts)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_reserved() + extra_mib * MIB


class _Postmortems(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.found: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = getattr(record, "torchmemguard_postmortem", None)
        if found is not None:
            self.found.append(found)


@contextlib.contextmanager
def postmortems() -> Iterator[list[dict[str, Any]]]:
    """The post-mortem records that the ``torchmemguard`` logger emits in the block.

    A handler of its own, not pytest's ``caplog``: ``check.py`` runs these tests
    without pytest's fixtures.
    """
    logger = logging.getLogger("torchmemguard")
    handler = _Postmortems()
    level = logger.level
    logger.addHandler(handler)
    if not logger.isEnabledFor(logging.ERROR):
        logger.setLevel(logging.ERROR)
    try:
        yield handler.found
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
