"""@oom_safe on real CUDA: a batch over the budget is split, recovered and merged."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

import torchmemguard
from tests.gpu.models import MIB, batch, headroom_cap, postmortems, reference, wide_mlp


def test_a_batch_over_the_budget_completes_equal_to_the_reference() -> None:
    model = wide_mlp()
    x = batch(4096)  # 256 MiB of hidden activations at once
    expected = reference(model, x)
    guarded = torchmemguard.guard(model)
    with torch.inference_mode(), torchmemguard.memory_budget(bytes=headroom_cap(200)):
        out = guarded(x)
    assert guarded.oom_guard.stats.ooms >= 1
    torch.testing.assert_close(out, expected)


def test_after_recovery_no_tensor_of_the_failed_attempt_is_left() -> None:
    model = wide_mlp()
    x = batch(4096)
    at_entry: list[int] = []

    @torchmemguard.oom_safe
    def forward(chunk: torch.Tensor) -> torch.Tensor:
        at_entry.append(torch.cuda.memory_allocated())
        return model(chunk)

    baseline = torch.cuda.memory_allocated()
    with torch.inference_mode(), torchmemguard.memory_budget(bytes=headroom_cap(200)):
        out = forward(x)
    assert forward.oom_guard.stats.ooms >= 1  # type: ignore[attr-defined]
    # Every attempt starts from the same memory: nothing of a failed one is left,
    # only the outputs of the chunks that succeeded, which are kept for the merge.
    assert at_entry[1] == at_entry[0] == baseline
    del out
    assert torch.cuda.memory_allocated() == baseline


def test_a_guarded_coroutine_recovers_under_the_budget() -> None:
    model = wide_mlp()
    x = batch(4096)
    expected = reference(model, x)

    @torchmemguard.oom_safe
    async def forward(chunk: torch.Tensor) -> torch.Tensor:
        await asyncio.sleep(0)
        return model(chunk)

    with torch.inference_mode(), torchmemguard.memory_budget(bytes=headroom_cap(200)):
        out = asyncio.run(forward(x))
    assert forward.oom_guard.stats.ooms >= 1  # type: ignore[attr-defined]
    torch.testing.assert_close(out, expected)


def test_threads_that_run_out_together_all_recover() -> None:
    model = wide_mlp()
    inputs = [batch(2048, seed=seed) for seed in range(4)]
    expected = [reference(model, x) for x in inputs]
    guarded = torchmemguard.guard(model)
    start = threading.Barrier(len(inputs))
    outputs: list[torch.Tensor | None] = [None] * len(inputs)
    errors: list[BaseException] = []

    def serve(i: int) -> None:
        try:
            with torch.inference_mode():
                start.wait()
                outputs[i] = guarded(inputs[i])
        except BaseException as exc:
            errors.append(exc)

    # Four batches of 128 MiB of activations each, at once, in 300 MiB.
    with torchmemguard.memory_budget(bytes=headroom_cap(300)):
        threads = [threading.Thread(target=serve, args=(i,)) for i in range(len(inputs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    assert guarded.oom_guard.stats.ooms >= 1
    for out, want in zip(outputs, expected, strict=True):
        assert out is not None
        torch.testing.assert_close(out, want)


def test_the_final_error_gives_the_cuda_memory_state() -> None:
    @torchmemguard.oom_safe
    def needs_64_mib_per_sample(x: torch.Tensor) -> torch.Tensor:
        return torch.empty(x.shape[0], 64 * MIB, dtype=torch.uint8, device=x.device)

    with torchmemguard.memory_budget(bytes=headroom_cap(16)):
        try:
            needs_64_mib_per_sample(batch(4))
        except torchmemguard.OutOfMemoryError as exc:
            message = str(exc)
        else:
            raise AssertionError("a 64 MiB sample fitted in 16 MiB")
    for part in ("ran out of memory on cuda", "allocated", "reserved", "total", "free", "cap"):
        assert part in message, message


def test_an_unrecovered_oom_logs_a_post_mortem_with_the_allocator_summary() -> None:
    model = wide_mlp()
    guarded = torchmemguard.guard(model, max_retries=2)
    x = batch(4096)  # made before the cap, which its 16 MiB would not fit under
    with (
        postmortems() as records,
        torch.inference_mode(),
        torchmemguard.memory_budget(bytes=headroom_cap(1)),
        pytest.raises(torchmemguard.OutOfMemoryError),
    ):
        guarded(x)
    (record,) = records
    assert record["device"].startswith("cuda")
    assert "allocator_summary" in record["memory"], record["memory"]
    assert record["memory"]["budget"] is not None
