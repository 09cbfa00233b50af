"""Tests for torchmemguard._integrations.generate: a guarded generate(), on a stand-in model.

tests/test_transformers.py runs the same against real transformers models.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

import torchmemguard
from torchmemguard._integrations.generate import _pad_token


class Generator(torch.nn.Module):
    """Generates ``prompt[0]`` tokens of 7 per prompt, then stops, like an early end."""

    def __init__(self, pad_token_id: int | None = 0, eos_token_id: Any = 2) -> None:
        super().__init__()
        self.generation_config = SimpleNamespace(
            pad_token_id=pad_token_id, eos_token_id=eos_token_id
        )
        self.calls: list[int] = []

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return input_ids * 2

    def generate(self, inputs: Any = None, **kwargs: Any) -> torch.Tensor:
        prompts = inputs if inputs is not None else kwargs["input_ids"]
        self.calls.append(prompts.shape[0])
        if prompts.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        pad = kwargs.get("pad_token_id", self.generation_config.pad_token_id)
        steps = int(prompts[:, 0].max())
        out = torch.full((prompts.shape[0], prompts.shape[1] + steps), pad)
        out[:, : prompts.shape[1]] = prompts
        for row, prompt in enumerate(prompts):
            out[row, prompts.shape[1] : prompts.shape[1] + int(prompt[0])] = 7
        return out


PROMPTS = torch.tensor([[1, 5], [3, 5], [2, 5], [1, 5]])


def test_guarded_generate_pads_chunks_that_stopped_early_with_the_pad_token() -> None:
    model = Generator(pad_token_id=0)
    out = torchmemguard.guard(model).generate(PROMPTS)
    expected = torch.tensor([[1, 5, 7, 0, 0], [3, 5, 7, 7, 7], [2, 5, 7, 7, 0], [1, 5, 7, 0, 0]])
    assert torch.equal(out, expected)
    assert model.calls == [4, 2, 2, 1]  # 1: the row check


def test_guarded_generate_counts_in_its_own_stats() -> None:
    guarded = torchmemguard.guard(Generator())
    guarded.generate(input_ids=PROMPTS)
    assert guarded.generate.oom_guard.stats.split_calls == 1
    assert guarded.oom_guard.stats.split_calls == 0


def test_guarded_generate_keeps_a_list_of_options_whole() -> None:
    seen = []
    model = Generator()
    real = model.generate

    def generate(inputs: Any = None, **kwargs: Any) -> torch.Tensor:
        seen.append(kwargs["stop_tokens"])
        return real(inputs, **kwargs)

    model.generate = generate  # type: ignore[method-assign]
    torchmemguard.guard(model).generate(PROMPTS, stop_tokens=[9, 9, 9, 9])
    assert seen == [[9, 9, 9, 9]] * 4  # the third: the row check


class Candidates(Generator):
    """Answers ``num_return_sequences`` rows per prompt (the config's, or as passed; or
    ``rows`` where passed, as a model with its own rules would): the prompt, then its
    candidate number."""

    def generate(self, inputs: Any = None, **kwargs: Any) -> torch.Tensor:
        self.calls.append(inputs.shape[0])
        if inputs.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        k = kwargs.get("num_return_sequences", self.generation_config.num_return_sequences)
        k = kwargs.get("rows", k)
        rows = inputs.repeat_interleave(k, dim=0)
        return torch.cat([rows, torch.arange(k).repeat(inputs.shape[0])[:, None]], dim=1)


def test_several_sequences_per_prompt_merge_in_order() -> None:
    model = Candidates()
    model.generation_config.num_return_sequences = 1
    out = torchmemguard.guard(model).generate(PROMPTS, num_return_sequences=3)
    expected = torch.cat(
        [PROMPTS.repeat_interleave(3, dim=0), torch.arange(3).repeat(4)[:, None]], dim=1
    )
    assert torch.equal(out, expected)


def test_the_configured_number_of_sequences_per_prompt_is_read_too() -> None:
    model = Candidates()
    model.generation_config.num_return_sequences = 2
    assert torchmemguard.guard(model).generate(PROMPTS).shape == (8, 3)


def test_a_refused_tensor_output_is_not_told_to_ask_for_what_it_is() -> None:
    model = Candidates()
    model.generation_config.num_return_sequences = 2
    guarded = torchmemguard.guard(model)
    # Two rows per prompt, where the call asks for one.
    with pytest.raises(torchmemguard.MergeError) as refused:
        guarded.generate(PROMPTS, num_return_sequences=1, rows=2)
    assert "return_dict_in_generate" not in str(refused.value)
    assert "batches that fit whole" in str(refused.value)


def test_module_without_generate_has_no_guarded_generate() -> None:
    with pytest.raises(AttributeError, match="generate"):
        torchmemguard.guard(torch.nn.Linear(2, 2)).generate  # noqa: B018


def test_pad_token_passed_to_generate_wins_over_the_config() -> None:
    assert _pad_token(Generator(pad_token_id=0), {"pad_token_id": 5}) == 5


def test_pad_token_comes_from_a_generation_config_passed_to_generate() -> None:
    config = SimpleNamespace(pad_token_id=4, eos_token_id=2)
    assert _pad_token(Generator(pad_token_id=0), {"generation_config": config}) == 4


def test_without_a_pad_token_the_first_end_token_pads() -> None:
    assert _pad_token(Generator(pad_token_id=None, eos_token_id=[6, 2]), {}) == 6


def test_an_end_token_tensor_gives_its_first_token_as_pad() -> None:
    assert _pad_token(Generator(pad_token_id=None), {"eos_token_id": torch.tensor([8, 9])}) == 8


def test_without_pad_or_end_token_there_is_no_pad_token() -> None:
    assert _pad_token(Generator(pad_token_id=None, eos_token_id=None), {}) is None
