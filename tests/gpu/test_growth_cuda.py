"""Growth back on real CUDA: a shape split under pressure runs whole once memory is freed,
sized from the allocator's measured peak, with no second OOM while the pressure lasts."""

from __future__ import annotations

import torch

import torchmemguard
from tests.gpu.models import MIB, batch, headroom_cap, reference, wide_mlp


def test_a_split_shape_runs_whole_again_once_the_memory_is_freed() -> None:
    model = wide_mlp()
    x = batch(2048)  # 128 MiB of hidden activations at once
    expected = reference(model, x)
    sizes: list[int] = []

    @torchmemguard.oom_safe
    def forward(chunk: torch.Tensor) -> torch.Tensor:
        sizes.append(chunk.shape[0])
        return model(chunk)

    with torch.inference_mode(), torchmemguard.memory_budget(bytes=headroom_cap(256)):
        held = torch.empty(160 * MIB, dtype=torch.uint8, device="cuda")
        for _ in range(3):
            out = forward(x)
        under_pressure = forward.oom_guard.stats.ooms  # type: ignore[attr-defined]
        split = list(sizes)
        del held
        sizes.clear()
        for _ in range(3):
            out = forward(x)
    # Only the first attempt ran out; the later calls were sized from their
    # measured peak, and ran whole as soon as the held memory was freed.
    assert under_pressure == 1
    assert forward.oom_guard.stats.ooms == 1  # type: ignore[attr-defined]
    assert max(split[1:]) < 2048
    assert sizes[-2:] == [2048, 2048]
    torch.testing.assert_close(out, expected)
