"""torchmemguard.Batcher: requests that come one at a time, batched up to what fits."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import torch

import torchmemguard
from torchmemguard import Batcher, BatchError, BatchTypeError, MergeError, QueueFullError

LONG = 60.0  # a max_wait that a test never reaches


class Recording(torch.nn.Module):
    """A linear model that records the rows of every batch it runs, and runs out of memory
    above ``limit`` rows."""

    def __init__(self, limit: int = 10**6) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(3, 2)
        self.limit = limit
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
        out: torch.Tensor = self.linear(x)
        return out


@pytest.fixture
def batchers() -> Iterator[Callable[..., Batcher]]:
    made: list[Batcher] = []

    def make(fn: Callable[..., Any], **options: Any) -> Batcher:
        made.append(Batcher(fn, **options))
        return made[-1]

    yield make
    for batcher in made:
        batcher.close()


def run(main: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(main())


def requests(n: int, rows: int = 1) -> list[torch.Tensor]:
    return [torch.full((rows, 3), float(i)) + torch.arange(3.0) for i in range(n)]


def test_every_answer_is_the_unbatched_calls_rows_in_order(
    batchers: Callable[..., Batcher],
) -> None:
    torch.manual_seed(1)
    mlp = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    batcher = batchers(mlp.eval(), max_wait=0.01)
    sent = [torch.randn(rows, 3) for rows in [1, 3, 1, 2, 1, 1, 4, 1] * 4]

    async def main() -> list[torch.Tensor]:
        return await asyncio.gather(*(batcher(x) for x in sent))

    answers = run(main)
    with torch.no_grad():
        for x, answer in zip(sent, answers, strict=True):
            torch.testing.assert_close(answer, mlp(x))


def test_a_group_runs_at_the_guards_learned_limit_without_waiting(
    batchers: Callable[..., Batcher], unmeasured: None
) -> None:
    model = Recording(limit=4)
    guarded = torchmemguard.guard(model)
    guarded(torch.zeros(8, 3))  # 8 runs out, then chunks of 4: the limit learned is 4
    assert list(guarded.oom_guard.learned().values()) == [4]
    model.sizes.clear()
    batcher = batchers(guarded, max_wait=LONG, max_batch=64)

    async def main() -> list[torch.Tensor]:
        return await asyncio.gather(*(batcher(x) for x in requests(8)))

    answers = run(main)
    # Two batches of 4; the first request of the first runs again alone, once, to check
    # that its rows do not depend on the others.
    assert model.sizes == [4, 1, 4]
    with torch.no_grad():
        assert all(
            torch.equal(a, model.linear(x)) for a, x in zip(answers, requests(8), strict=True)
        )


def test_a_group_runs_at_max_batch_rows_where_nothing_was_learned(
    batchers: Callable[..., Batcher],
) -> None:
    model = Recording()
    batcher = batchers(model, max_wait=0.2, max_batch=5)

    async def main() -> list[torch.Tensor]:
        return await asyncio.gather(*(batcher(x) for x in requests(3, rows=2)))

    run(main)
    # 2 + 2 rows fit in 5 and run at once (with the first request again alone, the
    # check); the third request's 2 would not: it runs after max_wait.
    assert model.sizes == [4, 2, 2]


def test_a_group_that_is_not_full_runs_after_max_wait(batchers: Callable[..., Batcher]) -> None:
    model = Recording()
    batcher = batchers(model, max_wait=0.2, max_batch=64)

    async def main() -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.gather(*(batcher(x) for x in requests(3)))
        return loop.time() - start

    waited = run(main)
    assert model.sizes == [3, 1]
    assert 0.2 <= waited < 5


def test_a_request_cancelled_while_it_waits_leaves_the_others_untouched(
    batchers: Callable[..., Batcher],
) -> None:
    model = Recording()
    batcher = batchers(model, max_wait=0.2)
    sent = requests(3)

    async def main() -> list[Any]:
        tasks = [asyncio.ensure_future(batcher(x)) for x in sent]
        await asyncio.sleep(0.01)
        tasks[1].cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    answers = run(main)
    assert isinstance(answers[1], asyncio.CancelledError)
    assert model.sizes == [2, 1]
    with torch.no_grad():
        for i in (0, 2):
            torch.testing.assert_close(answers[i], model.linear(sent[i]))


def test_a_request_its_keys_group_cannot_take_fails_alone(
    batchers: Callable[..., Batcher],
) -> None:
    batcher = batchers(torch.nn.Identity(), max_wait=0.05, key=lambda request: "one group for all")
    good, odd = torch.zeros(1, 3), torch.zeros(1, 5)

    async def main() -> list[Any]:
        return await asyncio.gather(batcher(good), batcher(odd), return_exceptions=True)

    answers = run(main)
    assert torch.equal(answers[0], good)
    assert isinstance(answers[1], BatchError)
    assert "[5]" in str(answers[1])
    assert "[3]" in str(answers[1])
    assert "'one group for all'" in str(answers[1])


def test_past_max_queue_a_request_gets_queue_full_and_the_others_their_answers(
    batchers: Callable[..., Batcher],
) -> None:
    model = Recording()
    batcher = batchers(model, max_wait=0.1, max_queue=2)

    async def main() -> list[Any]:
        return await asyncio.gather(*(batcher(x) for x in requests(3)), return_exceptions=True)

    answers = run(main)
    assert isinstance(answers[2], QueueFullError)
    assert "max_queue=2" in str(answers[2])
    assert [tuple(a.shape) for a in answers[:2]] == [(1, 2), (1, 2)]
    assert model.sizes == [2, 1]


def test_an_error_of_the_model_reaches_only_the_request_that_causes_it(
    batchers: Callable[..., Batcher],
) -> None:
    def picky(x: torch.Tensor) -> torch.Tensor:
        if (x < 0).any():
            raise ValueError("negative input")
        return x * 2

    batcher = batchers(picky, max_wait=0.05)
    sent = [torch.ones(1, 3), -torch.ones(1, 3), torch.full((1, 3), 2.0)]

    async def main() -> list[Any]:
        return await asyncio.gather(*(batcher(x) for x in sent), return_exceptions=True)

    answers = run(main)
    assert isinstance(answers[1], ValueError)
    assert str(answers[1]) == "negative input"
    assert torch.equal(answers[0], sent[0] * 2)
    assert torch.equal(answers[2], sent[2] * 2)


def test_rows_that_depend_on_each_other_are_run_one_request_at_a_time(
    batchers: Callable[..., Batcher], caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []

    def over_the_batch(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return torch.softmax(x, dim=0)

    batcher = batchers(over_the_batch, max_wait=0.05)
    sent = requests(3)

    async def main() -> list[torch.Tensor]:
        return await asyncio.gather(*(batcher(x) for x in sent))

    with caplog.at_level(logging.WARNING, logger="torchmemguard"):
        answers = run(main)
        later = run(main)
    for x, answer, again in zip(sent, answers, later, strict=True):
        assert torch.equal(answer, torch.softmax(x, dim=0))
        assert torch.equal(again, answer)
    assert calls == [3, 1, 1, 1, 1, 1, 1]
    warnings = [r.getMessage() for r in caplog.records if r.name == "torchmemguard"]
    assert len(warnings) == 1
    assert "over_the_batch answers differently in a batch than alone" in warnings[0]


def test_an_output_without_the_batchs_rows_is_refused_to_every_request(
    batchers: Callable[..., Batcher],
) -> None:
    batcher = batchers(lambda x: x.sum(), max_wait=0.05)

    async def main() -> list[Any]:
        return await asyncio.gather(*(batcher(x) for x in requests(2)), return_exceptions=True)

    answers = run(main)
    assert all(isinstance(answer, MergeError) for answer in answers)
    assert "output has the shape ()" in str(answers[0])


def test_requests_that_are_not_tensors_or_mappings_of_tensors_are_refused_naming_each_problem(
    batchers: Callable[..., Batcher],
) -> None:
    batcher = batchers(torch.nn.Identity())

    async def send(request: Any) -> Any:
        return await batcher(request)

    with pytest.raises(BatchTypeError, match="request must be a tensor"):
        run(lambda: send([1, 2, 3]))
    with pytest.raises(BatchTypeError) as raised:
        run(lambda: send({"a": torch.zeros(2, 3), "b": [1, 2], "c": torch.zeros(3)}))
    assert "request['b'] is a list" in str(raised.value)
    assert "different rows: [2, 3]" in str(raised.value)
    with pytest.raises(BatchError, match=r"request has no rows \(shape \(\)\)"):
        run(lambda: send(torch.tensor(1.0)))


def test_bad_arguments_are_named_together() -> None:
    with pytest.raises(TypeError) as raised:
        Batcher(torch.nn.Identity(), max_wait="soon", max_batch=0, max_queue=1.5, key=3)  # type: ignore[arg-type]
    message = str(raised.value)
    for expected in (
        "max_wait must be a number",
        "max_batch must be at least 1",
        "max_queue must be an int",
        "key must be a callable",
    ):
        assert expected in message


def test_an_async_function_is_refused() -> None:
    async def forward(x: torch.Tensor) -> torch.Tensor:
        return x

    with pytest.raises(TypeError, match="fn must be a sync callable"):
        Batcher(forward)


def bucket(request: Any) -> int:
    """A sequence-length bucket: the length rounded up to a multiple of 8."""
    length: int = request["input_ids"].shape[1]
    return -(-length // 8) * 8


def pad_to_bucket(request: Any, length: int) -> dict[str, torch.Tensor]:
    """Pad the ids with the pad token (0) and the mask with 0 to the bucket's length."""
    extra = length - request["input_ids"].shape[1]
    return {name: torch.nn.functional.pad(value, (0, extra)) for name, value in request.items()}


def test_a_bert_model_answers_padded_requests_like_each_one_alone(
    batchers: Callable[..., Batcher],
) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    torch.manual_seed(0)
    bert = transformers.BertModel(config).eval()
    calls: list[tuple[int, int]] = []
    bert.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True,
    )
    batcher = batchers(bert, max_wait=0.05, key=bucket, pad=pad_to_bucket)
    generator = torch.Generator().manual_seed(1)
    lengths = [5, 8, 3, 12, 16, 9, 7, 14]
    sent = [
        {
            "input_ids": torch.randint(1, 100, (1, length), generator=generator),
            "attention_mask": torch.ones(1, length, dtype=torch.long),
        }
        for length in lengths
    ]

    async def main() -> list[Any]:
        return await asyncio.gather(*(batcher(request) for request in sent))

    with torch.inference_mode():
        answers = run(main)
        for request, answer, length in zip(sent, answers, lengths, strict=True):
            alone = bert(**request)
            torch.testing.assert_close(
                answer.last_hidden_state[:, :length], alone.last_hidden_state, rtol=1e-4, atol=1e-5
            )
            torch.testing.assert_close(
                answer.pooler_output, alone.pooler_output, rtol=1e-4, atol=1e-5
            )
    # Two buckets, each one batch once max_wait passed, the one whose first request came
    # first first: of length 8 (5, 8, 3, 7) and 16 (12, 16, 9, 14), each with its first
    # request run again alone, padded, to check the rows.
    assert calls[:4] == [(4, 8), (1, 8), (4, 16), (1, 16)]


def test_close_fails_the_requests_still_waiting_and_refuses_new_ones() -> None:
    batcher = Batcher(torch.nn.Identity(), max_wait=LONG)

    async def main() -> list[Any]:
        waiting = asyncio.ensure_future(batcher(torch.zeros(1, 3)))
        await asyncio.sleep(0.01)
        batcher.close()
        return await asyncio.gather(waiting, batcher(torch.zeros(1, 3)), return_exceptions=True)

    answers = run(main)
    assert [str(answer) for answer in answers] == ["the batcher was closed"] * 2
    assert all(isinstance(answer, RuntimeError) for answer in answers)


def test_a_guarded_method_is_filled_to_the_limit_learned_for_its_instance(
    batchers: Callable[..., Batcher], unmeasured: None
) -> None:
    class Service:
        def __init__(self) -> None:
            self.sizes: list[int] = []

        @torchmemguard.oom_safe
        def predict(self, x: torch.Tensor) -> torch.Tensor:
            self.sizes.append(x.shape[0])
            if x.shape[0] > 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
            return x * 2

    service = Service()
    service.predict(torch.zeros(4, 3))  # 4 runs out, then chunks of 2: the limit is 2
    service.sizes.clear()
    batcher = batchers(service.predict, max_wait=LONG)

    async def main() -> list[torch.Tensor]:
        return await asyncio.gather(*(batcher(x) for x in requests(4)))

    answers = run(main)
    assert service.sizes == [2, 1, 2]
    for answer, x in zip(answers, requests(4), strict=True):
        assert torch.equal(answer, x * 2)
