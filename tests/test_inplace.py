"""An input changed in place by an attempt that ran out of memory is never retried on."""

from __future__ import annotations

import pytest
import torch

import torchmemguard
from tests.conftest import oom_above
from torchmemguard import SplitRefusedError
from torchmemguard import _inplace as inplace

# The out-of-memory errors here are raised by the tests and take no memory.
pytestmark = pytest.mark.usefixtures("unmeasured")


def test_an_input_divided_in_place_before_the_oom_is_refused_by_name() -> None:
    @torchmemguard.oom_safe
    def preprocess(pixels: torch.Tensor, scale: float = 255.0) -> torch.Tensor:
        pixels.div_(scale)
        oom_above(8, pixels.shape[0])
        return pixels * 2

    with pytest.raises(SplitRefusedError, match="changed 'pixels' in place") as caught:
        preprocess(torch.full((32, 3), 255.0))
    assert isinstance(caught.value.__cause__, torch.OutOfMemoryError)


def test_an_input_changed_in_place_inside_a_failed_chunk_is_refused() -> None:
    @torchmemguard.oom_safe(check_rows=False)
    def preprocess(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if batch["pixels"].shape[0] > 8:
            raise torch.OutOfMemoryError("CUDA out of memory.")  # before any change
        batch["pixels"].div_(255.0)
        oom_above(4, batch["pixels"].shape[0])
        return batch["pixels"]

    with pytest.raises(SplitRefusedError, match="changed 'batch' in place"):
        preprocess({"pixels": torch.full((32, 3), 255.0)})


def test_an_in_place_change_in_chunks_that_fit_answers_exactly() -> None:
    @torchmemguard.oom_safe
    def preprocess(pixels: torch.Tensor) -> torch.Tensor:
        oom_above(8, pixels.shape[0])  # before the change: nothing changed by a failure
        return pixels.div_(255.0) * 2

    x = torch.arange(32.0).unsqueeze(1).repeat(1, 3)
    out = preprocess(x.clone())
    assert torch.equal(out, x / 255.0 * 2)


def test_inference_tensors_are_guarded_and_their_changes_cannot_be_seen() -> None:
    sizes: list[int] = []

    @torchmemguard.oom_safe
    def double(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        sizes.append(x.shape[0])
        oom_above(8, x.shape[0])
        return x * scale

    with torch.inference_mode():
        x = torch.arange(32.0).unsqueeze(1)
        out = double(x, torch.tensor(2.0))
        again = double(x, scale=torch.tensor(2.0))
    assert torch.equal(out, x * 2)
    assert torch.equal(again, x * 2)
    assert sizes[:6] == [32, 16, 8, 8, 8, 8]
    assert sizes[6:8] == [1, 1]  # the row check


def test_versions_count_the_tensors_inside_structures_in_order() -> None:
    a, b, c = torch.zeros(2), torch.zeros(2), torch.zeros(2)
    b.add_(1)
    found = inplace.versions((a, {"b": b, "n": 3}), {"c": [c], "text": ["x"]})
    assert found == [0, 1, 0]
    assert inplace.careful_versions((a, {"b": b, "n": 3}), {"c": [c], "text": ["x"]}) == found


def test_changed_names_each_argument_changed_since_the_counts_were_read() -> None:
    a, b = torch.zeros(2), torch.zeros(2)
    before = inplace.versions((a,), {"mask": {"m": b}})
    b.mul_(2)
    assert inplace.changed((a,), {"mask": {"m": b}}, before, {0: "x"}) == ["mask"]
    a.add_(1)
    assert inplace.changed((a,), {"mask": {"m": b}}, before, {0: "x"}) == ["x", "mask"]


def test_an_inference_tensor_makes_the_plain_reading_raise_and_the_careful_one_skip() -> None:
    with torch.inference_mode():
        x = torch.zeros(2)
    with pytest.raises(RuntimeError):
        inplace.versions((x,), {})
    assert inplace.careful_versions((x, torch.zeros(1)), {}) == [-1, 0]
