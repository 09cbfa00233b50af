"""NumPy arrays in and out of guarded calls: split by rows, merged, refused where they
cannot merge, checked by the row check, and nothing needed without NumPy."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import torchmemguard
from tests.realcap import address_space_cap, prepare_child, run_child
from torchmemguard import MergeError
from torchmemguard._merging import Merger
from torchmemguard._structures import batch_size_of, split


def table(n: int, width: int = 3) -> np.ndarray:
    return np.arange(n * width, dtype=np.float32).reshape(n, width)


class ArrayLimit:
    """A per-row function of NumPy arrays that runs out of memory above ``limit`` rows."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.sizes: list[int] = []

    def __call__(self, x: np.ndarray, weights: np.ndarray) -> np.ndarray:
        self.sizes.append(len(x))
        if len(x) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        out: np.ndarray = x @ weights + 1
        return out


def test_an_array_with_the_batch_as_its_leading_size_is_split_by_rows() -> None:
    batch = {"x": table(6), "scale": np.ones(3)}
    assert batch_size_of(batch) == 6
    piece = split(batch, 6, 2, 4)
    assert np.array_equal(piece["x"], table(6)[2:4])
    assert piece["scale"] is batch["scale"]


def test_array_outputs_merge_one_row_per_sample() -> None:
    merged = Merger()([table(6)[:4], table(6)[4:]])
    assert isinstance(merged, np.ndarray)
    assert np.array_equal(merged, table(6))


def test_array_outputs_fill_in_the_whole_batchs_rows_as_chunks_return() -> None:
    merger, whole_batch = Merger(), table(6)
    whole = merger.whole_of({"e": whole_batch[:2]}, 2, 6)
    assert whole["e"].shape == (6, 3)
    assert whole["e"].dtype == np.float32
    for start in (0, 2, 4):
        assert merger.fill(whole, {"e": whole_batch[start : start + 2]}, start, 2)
    assert np.array_equal(whole["e"], whole_batch)
    assert np.shares_memory(merger.rows(whole, 2, 2)["e"], whole["e"])


def test_an_array_of_another_dtype_ends_the_filling() -> None:
    merger = Merger()
    whole = merger.whole_of(table(2), 2, 4)
    assert not merger.fill(whole, table(2).astype(np.float64), 2, 2)


def test_arrays_of_different_trailing_shapes_are_named_with_path_and_shapes() -> None:
    with pytest.raises(MergeError, match=r"output\['e'\].*\(2, 3\) and \(2, 4\)"):
        Merger().check({"e": table(2, 4)}, 2, {"e": table(2)}, 2)


def test_an_object_array_is_refused_at_the_first_chunk() -> None:
    objects = np.array([{"a": 1}, {"b": 2}], dtype=object)
    with pytest.raises(MergeError, match=r"output\[0\]: .*Python objects"):
        Merger().check((objects,), 2)


def test_a_zero_dimensional_array_is_refused_as_a_reduced_value() -> None:
    with pytest.raises(MergeError, match=r"output: a chunk returned a 0-d array \(1\.5\)"):
        Merger().check(np.array(1.5), 2)


def test_an_array_that_is_not_one_row_per_sample_is_named_with_its_shape() -> None:
    with pytest.raises(MergeError, match=r"chunk of 4 samples returned an array of shape \(2, 3\)"):
        Merger().check(table(2), 4, table(4), 4)


def test_an_array_and_a_tensor_from_two_chunks_do_not_merge() -> None:
    with pytest.raises(MergeError, match="ndarray and a Tensor"):
        Merger().check(torch.zeros(2, 3), 2, table(2), 2)


def test_a_guarded_function_of_arrays_equals_the_whole_batch_after_an_oom() -> None:
    fn = ArrayLimit(16)
    weights = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    x = table(64)
    out = torchmemguard.oom_safe(fn)(x, weights)
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, x @ weights + 1, rtol=1e-6)
    assert fn.sizes[:3] == [64, 32, 16]


def test_rows_of_arrays_that_depend_on_each_other_are_refused() -> None:
    def standardise(x: np.ndarray) -> np.ndarray:
        if len(x) > 16:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        out: np.ndarray = (x - x.mean(axis=0)) / x.std(axis=0)
        return out

    with pytest.raises(torchmemguard.SplitRefusedError, match="depend on each other"):
        torchmemguard.oom_safe(standardise)(np.random.default_rng(0).normal(size=(64, 3)))


def test_arrays_of_strings_merge_and_are_compared_exactly() -> None:
    def label(x: np.ndarray) -> np.ndarray:
        if len(x) > 4:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return np.where(x[:, 0] > 10, "high", "low")

    assert list(torchmemguard.oom_safe(label)(table(8))) == ["low"] * 4 + ["high"] * 4


def test_without_numpy_a_guarded_call_runs_and_nothing_imports_it() -> None:
    script = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["numpy"] = None  # as if it were not installed
        warnings.simplefilter("ignore")  # torch says it misses NumPy
        import torch, torchmemguard

        @torchmemguard.oom_safe
        def double(x):
            if x.shape[0] > 2:
                raise torch.OutOfMemoryError("CUDA out of memory.")
            return x * 2

        assert torch.equal(double(torch.arange(5.0)), torch.arange(5.0) * 2)
        assert sys.modules["numpy"] is None
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# ---------------------------------------------------------------------------
# Under a real cap


def _scenario_arrays(headroom_mib: float) -> dict[str, object]:
    prepare_child()
    # A scikit-learn-style predict: arrays in and out, a torch MLP inside. A chunk of c
    # rows peaks at about c * 32 KiB, so the whole batch of 4096 takes 130 MiB.
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 256)
    ).eval()

    @torchmemguard.oom_safe
    def predict(features: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out: np.ndarray = model(torch.from_numpy(features)).numpy()
        return out

    features = np.random.default_rng(0).normal(size=(4096, 256)).astype(np.float32)
    outputs = []
    with address_space_cap(headroom_mib):
        for _ in range(2):
            outputs.append(predict(features))
    reference = predict.__wrapped__(features)  # after the cap, whole
    return {
        "types": [type(out).__name__ for out in outputs],
        "equal": [bool(np.allclose(out, reference, rtol=1e-5, atol=1e-5)) for out in outputs],
        "ooms": predict.oom_guard.stats.ooms,  # type: ignore[attr-defined]
    }


@pytest.mark.slow
def test_a_function_of_arrays_under_a_real_cap_equals_the_whole_batch() -> None:
    run = run_child("tests.test_arrays:_scenario_arrays", 48)
    assert run["types"] == ["ndarray", "ndarray"], run
    assert run["equal"] == [True, True], run
    assert run["ooms"] >= 1, run
