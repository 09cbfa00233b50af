"""The public decorators: what they wrap, what they keep, what they refuse."""

from __future__ import annotations

import asyncio
import copy
import inspect
import multiprocessing
import pickle
import threading
import typing
import warnings

import pytest
import torch

import torchmemguard
from tests.conftest import ChunkLimit, ScarceModule, rows
from tests.guarded_functions import Doubler, double_in_pairs


def oom_above(limit: int, x: torch.Tensor) -> None:
    if x.shape[0] > limit:
        raise torch.OutOfMemoryError("CUDA out of memory.")


def test_bare_decorator_guards_a_function() -> None:
    assert torch.equal(double_in_pairs(torch.arange(5.0)), torch.arange(5.0) * 2)


def test_signature_and_wrapped_are_kept() -> None:
    def scale(x: torch.Tensor, factor: float = 2.0) -> torch.Tensor:
        return x * factor

    guarded = torchmemguard.oom_safe(scale)
    assert inspect.signature(guarded) == inspect.signature(scale)
    assert guarded.__wrapped__ is scale
    assert guarded.__name__ == "scale"
    assert typing.get_type_hints(guarded) == typing.get_type_hints(scale)


class PairModel:
    """A guarded method that runs out of memory for more than two samples."""

    @torchmemguard.oom_safe
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        oom_above(2, x)
        return x + 1


def test_instance_method_splits_the_first_argument_after_self() -> None:
    assert torch.equal(PairModel().predict(torch.zeros(5)), torch.ones(5))


def test_instance_method_called_through_the_class_splits_too() -> None:
    model = PairModel()
    assert torch.equal(PairModel.predict(model, torch.zeros(5)), torch.ones(5))


def test_each_instance_learns_its_own_size() -> None:
    class Model:
        def __init__(self, limit: int) -> None:
            self.limit = limit
            self.sizes: list[int] = []

        @torchmemguard.oom_safe
        def predict(self, x: torch.Tensor) -> torch.Tensor:
            self.sizes.append(x.shape[0])
            oom_above(self.limit, x)
            return x

    small, large = Model(2), Model(8)
    small.predict(torch.zeros(8))
    large.predict(torch.zeros(8))
    assert large.sizes == [8]


def test_classmethod_is_guarded() -> None:
    class Model:
        @torchmemguard.oom_safe
        @classmethod
        def predict(cls, x: torch.Tensor) -> torch.Tensor:
            oom_above(2, x)
            return x + 1

    assert torch.equal(Model.predict(torch.zeros(5)), torch.ones(5))


def test_staticmethod_is_guarded() -> None:
    class Model:
        @torchmemguard.oom_safe
        @staticmethod
        def predict(x: torch.Tensor) -> torch.Tensor:
            oom_above(2, x)
            return x + 1

    assert torch.equal(Model().predict(torch.zeros(5)), torch.ones(5))


def test_options_on_a_method_name_arguments_after_self() -> None:
    class Model:
        @torchmemguard.oom_safe(batch_args=("ids", "mask"))
        def predict(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            oom_above(2, ids)
            return ids * mask

    out = Model().predict(torch.ones(5), mask=torch.full((5,), 3.0))
    assert torch.equal(out, torch.full((5,), 3.0))


def test_guard_state_is_reachable_from_a_bound_method() -> None:
    class Model:
        @torchmemguard.oom_safe
        def predict(self, x: torch.Tensor) -> torch.Tensor:
            oom_above(2, x)
            return x

    model = Model()
    model.predict(torch.zeros(4))
    assert model.predict.oom_guard.stats.ooms == 1


def test_async_function_stays_a_coroutine_function() -> None:
    @torchmemguard.oom_safe
    async def predict(x: torch.Tensor) -> torch.Tensor:
        return x

    assert inspect.iscoroutinefunction(predict)


def test_async_function_retries_are_awaited() -> None:
    fn = ChunkLimit(4)

    @torchmemguard.oom_safe
    async def predict(x: torch.Tensor) -> torch.Tensor:
        await asyncio.sleep(0)
        return fn(x)

    out = asyncio.run(predict(torch.arange(16.0)))
    assert torch.equal(out, torch.arange(16.0) * 2 + 1)
    assert fn.sizes == [16, 8, 4, 4, 4, 4, 1, 1]  # 1, 1: the row check


def test_async_cancellation_is_not_retried() -> None:
    attempts = []

    @torchmemguard.oom_safe
    async def predict(x: torch.Tensor) -> torch.Tensor:
        attempts.append(x.shape[0])
        await asyncio.sleep(10)
        return x

    async def main() -> None:
        task = asyncio.create_task(predict(torch.zeros(4)))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert attempts == [4]


def test_concurrent_async_calls_each_get_their_own_result() -> None:
    @torchmemguard.oom_safe
    async def predict(x: torch.Tensor) -> torch.Tensor:
        await asyncio.sleep(0)
        oom_above(3, x)
        return x * 2

    async def main() -> list[torch.Tensor]:
        return await asyncio.gather(*(predict(torch.full((10,), float(i))) for i in range(8)))

    for i, out in enumerate(asyncio.run(main())):
        assert torch.equal(out, torch.full((10,), 2.0 * i))


def test_threads_recovering_at_once_all_get_correct_results() -> None:
    barrier = threading.Barrier(4)
    first = threading.local()

    @torchmemguard.oom_safe
    def predict(x: torch.Tensor) -> torch.Tensor:
        if not getattr(first, "done", False):
            first.done = True
            barrier.wait(timeout=10)  # every thread runs out of memory at once
        oom_above(4, x)
        return x * 2

    results: dict[int, torch.Tensor] = {}

    def work(i: int) -> None:
        results[i] = predict(torch.full((16,), float(i)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert {i: out.tolist() for i, out in results.items()} == {i: [2.0 * i] * 16 for i in range(4)}


def test_module_level_guarded_function_pickles_by_reference() -> None:
    assert pickle.loads(pickle.dumps(double_in_pairs)) is double_in_pairs


def test_bound_guarded_method_pickles_with_its_instance() -> None:
    method = pickle.loads(pickle.dumps(Doubler().double_in_pairs))
    assert torch.equal(method(torch.arange(5.0)), torch.arange(5.0) * 2)


def test_guarded_function_runs_in_a_spawned_worker() -> None:
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        out = pool.apply(double_in_pairs, (torch.arange(5.0),))
    assert torch.equal(out, torch.arange(5.0) * 2)


def test_bad_options_fail_at_decoration() -> None:
    def fn(x: torch.Tensor) -> torch.Tensor:
        return x

    with pytest.raises(TypeError, match="'nope'"):
        torchmemguard.oom_safe(batch_args=("nope",))(fn)
    with pytest.raises(ValueError, match="min_chunk must be at least 1, got 0"):
        torchmemguard.oom_safe(min_chunk=0)
    with pytest.raises(TypeError, match="min_chunk must be an int, got True"):
        torchmemguard.oom_safe(min_chunk=True)
    with pytest.raises(TypeError, match="batch_args must be a name or a sequence of names"):
        torchmemguard.oom_safe(batch_args=3)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="merge must be callable"):
        torchmemguard.oom_safe(merge="cat")  # type: ignore[call-overload]


def test_oom_safe_refuses_a_non_callable() -> None:
    with pytest.raises(TypeError, match="oom_safe needs a callable, got 42"):
        torchmemguard.oom_safe(42)  # type: ignore[call-overload]


class Scale(torch.nn.Module):
    def __init__(self, limit: int = 1000) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((3,), 2.0))
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        oom_above(self.limit, x)
        return x * self.weight


def test_guarded_module_is_still_the_module() -> None:
    module = Scale()
    guarded = torchmemguard.guard(module)
    assert isinstance(guarded, torch.nn.Module)
    assert isinstance(guarded, Scale)
    assert guarded.limit == 1000
    assert list(guarded.parameters()) == list(module.parameters())
    assert guarded.state_dict().keys() == module.state_dict().keys()


def test_guarded_module_call_is_guarded() -> None:
    guarded = torchmemguard.guard(Scale(limit=2))
    out = guarded(torch.ones(5, 3))
    assert torch.equal(out, torch.full((5, 3), 2.0))
    assert guarded.oom_guard.stats.ooms == 1  # 5 samples, then chunks of 2


def test_to_and_eval_return_the_guarded_module() -> None:
    guarded = torchmemguard.guard(Scale(limit=2))
    assert guarded.to(torch.float64) is guarded
    assert guarded.eval() is guarded
    assert guarded.weight.dtype == torch.float64
    assert not guarded.training


def test_attribute_writes_reach_the_module() -> None:
    module = Scale()
    guarded = torchmemguard.guard(module)
    guarded.limit = 7
    assert module.limit == 7


def test_guarded_submodule_is_guarded_inside_its_parent() -> None:
    parent = torch.nn.Sequential(torchmemguard.guard(Scale(limit=2)))
    out = parent(torch.ones(5, 3))
    assert torch.equal(out, torch.full((5, 3), 2.0))
    assert "0.weight" in parent.state_dict()


def test_guarded_module_pickles_with_its_options() -> None:
    guarded = torchmemguard.guard(Scale(limit=2), min_chunk=1, grow_after=5)
    copy = pickle.loads(pickle.dumps(guarded))
    assert isinstance(copy, Scale)
    assert copy.oom_guard.options == guarded.oom_guard.options
    assert torch.equal(copy(torch.ones(5, 3)), torch.full((5, 3), 2.0))


def test_forward_called_directly_shares_the_modules_guard() -> None:
    module = ScarceModule(torch.nn.Identity(), limit=16)
    guarded = torchmemguard.guard(module)
    assert torch.equal(guarded.forward(rows(64)), rows(64))
    module.sizes.clear()
    guarded(rows(64))
    assert module.sizes == [16, 16, 16, 16]
    assert guarded.oom_guard.stats.ooms == guarded.forward.oom_guard.stats.ooms == 2


def test_a_call_reaching_forward_inside_is_guarded_once() -> None:
    module = ScarceModule(torch.nn.Identity(), limit=16)
    guarded = torchmemguard.guard(module)
    guarded(rows(64))
    # 64 and 32 ran out; a second guard around forward would have caught them again.
    assert module.sizes[:3] == [64, 32, 16]
    assert guarded.oom_guard.stats.ooms == 2


class Embedder(torch.nn.Module):
    """Embeds lists of words: ``embed`` runs out of memory above four words."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def embed(self, words: list[str], scale: float = 1.0) -> torch.Tensor:
        self.sizes.append(len(words))
        if len(words) > 4:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return torch.tensor([[len(w) * scale] for w in words])


WORDS = ["a", "bb", "ccc", "dddd", "eeeee", "ffffff", "g", "hh", "iii", "jjjj"]


def test_a_method_named_in_methods_splits_its_list_and_keeps_its_own_guard() -> None:
    module = Embedder()
    guarded = torchmemguard.guard(module, methods=("embed",))
    out = guarded.embed(WORDS, scale=2.0)
    assert torch.equal(out, torch.tensor([[len(w) * 2.0] for w in WORDS]))
    assert module.sizes[:3] == [10, 5, 2]
    assert guarded.embed.oom_guard.stats.ooms == 2
    assert guarded.embed.oom_guard.name == "Embedder.embed"
    assert guarded.oom_guard.stats.ooms == 0


def test_methods_that_the_module_lacks_are_all_named_at_once() -> None:
    with pytest.raises(ValueError, match=r"'embedd'.*'forward'"):
        torchmemguard.guard(Embedder(), methods=("embedd", "forward"))
    with pytest.raises(TypeError, match="methods must be a sequence"):
        torchmemguard.guard(Embedder(), methods="embed")


def test_threads_that_race_on_a_method_share_its_one_guard() -> None:
    module = Embedder()
    guarded = torchmemguard.guard(module, methods=("embed",))
    start = threading.Barrier(8)
    found: list[object] = []

    def work() -> None:
        start.wait(timeout=30)
        found.append(guarded.embed)
        guarded.embed(WORDS)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(found) == 8
    assert all(method is found[0] for method in found)
    assert guarded.embed.oom_guard.stats.split_calls == 8


def test_a_guarded_module_keeps_its_methods_through_a_copy() -> None:
    guarded = torchmemguard.guard(Embedder(), methods=("embed",))
    for again in (copy.deepcopy(guarded), pickle.loads(pickle.dumps(guarded))):
        again.embed(WORDS)
        assert again.embed.oom_guard.stats.split_calls == 1


def test_guard_refuses_what_is_not_a_module() -> None:
    with pytest.raises(TypeError, match=r"guard needs an nn\.Module"):
        torchmemguard.guard(lambda x: x)  # type: ignore[type-var]


class BatchNormModel(torch.nn.Sequential):
    """A batch-coupled model that runs out of memory above four samples."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        oom_above(4, x)
        out: torch.Tensor = super().forward(x)
        return out


def batch_norm_model() -> BatchNormModel:
    return BatchNormModel(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))


def test_batch_norm_in_training_is_refused_by_the_row_check_then_at_once() -> None:
    sizes: list[int] = []
    model = batch_norm_model()
    model.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    guarded = torchmemguard.guard(model)
    with pytest.raises(torchmemguard.SplitRefusedError, match="depend on each other"):
        guarded(torch.randn(8, 3))
    sizes.clear()
    with pytest.raises(torchmemguard.SplitRefusedError, match="depend on each other"):
        guarded(torch.randn(8, 3))
    assert sizes == [8]


def test_batch_norm_in_training_warns_once_when_split_unchecked() -> None:
    model = batch_norm_model()
    guarded = torchmemguard.guard(model, check_rows=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        guarded(torch.randn(8, 3))
        guarded(torch.randn(8, 3))
    assert [str(w.message).count("BatchNorm1d") for w in record] == [1]


def test_batch_norm_in_eval_mode_does_not_warn() -> None:
    model = batch_norm_model().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torchmemguard.guard(model)(torch.randn(8, 3))


def test_method_called_through_the_class_finds_keyword_batch_arguments() -> None:
    class Model:
        @torchmemguard.oom_safe(batch_args=("y",))
        def predict(self, scale: float, y: torch.Tensor) -> torch.Tensor:
            oom_above(2, y)
            return y * scale

    model = Model()
    assert torch.equal(Model.predict(model, 2.0, y=torch.ones(5)), torch.full((5,), 2.0))


def test_async_callable_object_is_guarded_as_async() -> None:
    class Predictor:
        async def __call__(self, x: torch.Tensor) -> torch.Tensor:
            oom_above(2, x)
            return x + 1

    guarded = torchmemguard.oom_safe(Predictor())
    assert torch.equal(asyncio.run(guarded(torch.zeros(5))), torch.ones(5))


def test_guarded_method_reached_through_its_class_pickles() -> None:
    method = pickle.loads(pickle.dumps(Doubler.double_in_pairs))
    assert torch.equal(method(Doubler(), torch.arange(5.0)), torch.arange(5.0) * 2)


def test_deep_copy_of_a_guarded_module_is_a_guarded_copy() -> None:
    guarded = torchmemguard.guard(Scale(limit=2))
    clone = copy.deepcopy(guarded)
    assert isinstance(clone, Scale)
    assert clone.weight is not guarded.weight
    assert torch.equal(clone(torch.ones(5, 3)), torch.full((5, 3), 2.0))
    assert clone.oom_guard.stats.ooms == 1


def test_shallow_copy_of_a_guarded_module_shares_the_parameters() -> None:
    guarded = torchmemguard.guard(Scale(limit=2))
    clone = copy.copy(guarded)
    assert clone.weight is guarded.weight
    assert clone.oom_guard is not guarded.oom_guard


def test_batch_norm_warning_points_at_the_caller() -> None:
    model = batch_norm_model()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        torchmemguard.guard(model, check_rows=False)(torch.randn(8, 3))
    assert [w.filename for w in record] == [__file__]


def test_shallow_copy_of_a_guarded_module_wraps_a_copy() -> None:
    model = torchmemguard.guard(torch.nn.Linear(2, 2))
    clone = copy.copy(model)
    clone.eval()
    assert model.training
    assert clone.oom_guard is not model.oom_guard


def test_frozen_batch_norm_in_a_training_module_does_not_warn() -> None:
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm1d(3)

        def forward(self, x):
            if x.shape[0] > 2:
                raise torch.OutOfMemoryError("CUDA out of memory.")
            return self.bn(x)

    net = Net()
    net.bn.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torchmemguard.guard(net)(torch.ones(4, 3))


def test_async_non_oom_exception_in_a_later_chunk_passes_through() -> None:
    error = KeyError("late")

    @torchmemguard.oom_safe
    async def fn(x):
        if x.shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        if x[0, 0] >= 4:
            raise error
        return x

    with pytest.raises(KeyError) as caught:
        asyncio.run(fn(rows(8)))
    assert caught.value is error
