"""Real transformers models under the guard, with out-of-memory errors injected.

Each model is built from a tiny config (no weights are downloaded), and an
inner module gets a forward pre-hook that raises ``torch.OutOfMemoryError``
for batches above a limit, as a full GPU would. The reference is always the
same model's own answer to the whole batch, computed before the hook is in
place: token ids must be equal, floats close (a chunk changes the row count of
every matrix product, so the last bits may differ).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import torchmemguard

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

RTOL = 1e-5
ATOL = 1e-5

VOCAB = 64
PAD, EOS, UNK = 0, 1, 2  # the first ids of every vocabulary below; words follow
WORDS = [f"w{i}" for i in range(VOCAB - 3)]


def close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return torch.allclose(actual, expected, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------
# Builders: tiny models and a word-level tokenizer, the same on every call


def build(factory: Callable[[], torch.nn.Module], seed: int = 0) -> torch.nn.Module:
    """``factory()`` in eval mode, with weights drawn from ``seed``; the global RNG is kept."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return factory().eval()


def bert_model() -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=PAD,
    )
    return build(lambda: transformers.BertModel(config))


def gpt2_model(pad_token_id: int | None = PAD) -> torch.nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        bos_token_id=EOS,
        eos_token_id=EOS,
        pad_token_id=pad_token_id,
        # No dropout: the training steps compare gradients of two runs.
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return build(lambda: transformers.GPT2LMHeadModel(config))


def bart_model() -> torch.nn.Module:
    # A wide initialisation: with the default one, a random BART answers every
    # prompt with end-of-sequence at once, which would prove nothing.
    config = transformers.BartConfig(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        pad_token_id=PAD,
        bos_token_id=UNK,
        eos_token_id=EOS,
        decoder_start_token_id=EOS,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
        init_std=1.0,
    )
    return build(lambda: transformers.BartForConditionalGeneration(config))


def tokenizer(padding_side: str = "right") -> Any:
    vocab = {"<pad>": PAD, "<eos>": EOS, "<unk>": UNK}
    vocab.update({word: i + 3 for i, word in enumerate(WORDS)})
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tok.padding_side = padding_side
    return tok


# Eight texts of 2 to 6 words: a batch of 4 is padded.
TEXTS = [" ".join(WORDS[(7 * i + 3 * j) % len(WORDS)] for j in range(2 + i % 5)) for i in range(8)]

# Six sequences of 8 tokens, of these lengths: padded rows make the mask matter.
LENGTHS = torch.tensor([8, 5, 3, 8, 6, 4])
WIDTH = 8


def random_tokens() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, VOCAB, (len(LENGTHS), WIDTH), generator=generator)


def right_padded() -> tuple[torch.Tensor, torch.Tensor]:
    mask = (torch.arange(WIDTH)[None, :] < LENGTHS[:, None]).long()
    return random_tokens() * mask + PAD * (1 - mask), mask


def left_padded() -> tuple[torch.Tensor, torch.Tensor]:
    mask = (torch.arange(WIDTH)[None, :] >= (WIDTH - LENGTHS)[:, None]).long()
    return random_tokens() * mask + PAD * (1 - mask), mask


def bert_encoding() -> Any:
    input_ids, attention_mask = right_padded()
    token_type_ids = (torch.arange(WIDTH)[None, :] >= 3).long().expand_as(input_ids)
    return transformers.BatchEncoding(
        {
            "input_ids": input_ids,
            "token_type_ids": (token_type_ids * attention_mask).contiguous(),
            "attention_mask": attention_mask,
        }
    )


# ---------------------------------------------------------------------------
# Injected out-of-memory errors


class OomAbove:
    """A forward pre-hook that runs out of memory for batches above ``limit``.

    It records the batch size of every forward it sees.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.sizes: list[int] = []

    def __call__(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


Inject = Callable[[torch.nn.Module, int], OomAbove]


@pytest.fixture
def inject_oom() -> Iterator[Inject]:
    """``inject_oom(module, limit)``: make ``module`` run out above ``limit`` samples."""
    handles: list[Any] = []

    def inject(module: torch.nn.Module, limit: int) -> OomAbove:
        hook = OomAbove(limit)
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        return hook

    yield inject
    for handle in handles:
        handle.remove()


# ---------------------------------------------------------------------------
# BERT forward


def test_bert_called_with_batch_encoding_equals_whole_batch_after_an_oom(
    inject_oom: Inject,
) -> None:
    bert, encoding = bert_model(), bert_encoding()
    with torch.no_grad():
        reference = bert(**encoding)
    inject_oom(bert.embeddings, 2)
    guarded = torchmemguard.guard(bert)
    with torch.no_grad():
        output = guarded(**encoding)
    assert type(output) is type(reference)
    assert close(output.last_hidden_state, reference.last_hidden_state)
    assert close(output.pooler_output, reference.pooler_output)


def test_bert_called_with_batch_encoding_is_split_after_an_oom(inject_oom: Inject) -> None:
    bert, encoding = bert_model(), bert_encoding()
    inject_oom(bert.embeddings, 2)
    guarded = torchmemguard.guard(bert)
    with torch.no_grad():
        guarded(**encoding)
    stats = guarded.oom_guard.stats
    assert stats.ooms >= 1
    assert stats.split_calls == 1
    assert stats.unrecovered == 0


def test_bert_called_positionally_with_a_mask_keyword_equals_whole_batch(
    inject_oom: Inject,
) -> None:
    bert = bert_model()
    input_ids, attention_mask = right_padded()
    with torch.no_grad():
        reference = bert(input_ids, attention_mask=attention_mask)
    inject_oom(bert.embeddings, 2)
    guarded = torchmemguard.guard(bert)
    with torch.no_grad():
        output = guarded(input_ids, attention_mask=attention_mask)
    assert guarded.oom_guard.stats.split_calls == 1
    assert close(output.last_hidden_state, reference.last_hidden_state)
    assert close(output.pooler_output, reference.pooler_output)


def test_bert_batch_args_leaving_out_the_mask_raise_batch_error_naming_it(
    inject_oom: Inject,
) -> None:
    bert = bert_model()
    seen = inject_oom(bert.embeddings, 2)
    guarded = torchmemguard.guard(bert, batch_args=("input_ids", "token_type_ids"))
    with torch.no_grad(), pytest.raises(torchmemguard.BatchError) as caught:
        guarded(**bert_encoding())
    message = str(caught.value)
    assert "'attention_mask'" in message
    assert "'token_type_ids'" not in message.split("batch_args=")[0]
    assert "batch_args=(" in message
    assert "whole_args=(" in message
    assert seen.sizes == [len(LENGTHS)]  # the whole attempt only: no chunk ran


def test_bert_batch_args_leaving_out_two_arguments_name_both_in_one_error(
    inject_oom: Inject,
) -> None:
    bert = bert_model()
    seen = inject_oom(bert.embeddings, 2)
    guarded = torchmemguard.guard(bert, batch_args=("input_ids",))
    with torch.no_grad(), pytest.raises(torchmemguard.BatchError) as caught:
        guarded(**bert_encoding())
    message = str(caught.value)
    assert "'attention_mask'" in message
    assert "'token_type_ids'" in message
    assert "batch_args=(" in message
    assert "whole_args=(" in message
    assert seen.sizes == [len(LENGTHS)]


# ---------------------------------------------------------------------------
# GPT-2 generate()

GREEDY = {"do_sample": False, "max_new_tokens": 6}


def first_tokens(model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor) -> list[int]:
    """The first token that greedy generation gives each row."""
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=mask, do_sample=False, max_new_tokens=1)
    tokens: list[int] = out[:, -1].tolist()
    return tokens


def eos_of_second_half(
    model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor
) -> list[int]:
    """End-of-sequence tokens that stop the rows of the second half after one step,
    and the rows of the first half never (checked by the tests' references)."""
    return first_tokens(model, input_ids, mask)[len(LENGTHS) // 2 :]


def guarded_generate(model: Any, inject_oom: Inject, limit: int, *args: Any, **kwargs: Any) -> Any:
    """``guard(model).generate(*args, **kwargs)`` with OOMs above ``limit`` prompts,
    checked to have split the batch."""
    inject_oom(model.transformer, limit)
    guarded = torchmemguard.guard(model)
    with torch.no_grad():
        output = guarded.generate(*args, **kwargs)
    assert guarded.generate.oom_guard.stats.split_calls >= 1
    return output


def test_gpt2_generate_equals_whole_batch_after_an_oom(inject_oom: Inject) -> None:
    model = gpt2_model()
    input_ids, mask = left_padded()
    with torch.no_grad():
        reference = model.generate(input_ids, attention_mask=mask, **GREEDY)
    assert reference.shape[1] == WIDTH + GREEDY["max_new_tokens"]
    assert not (reference[:, WIDTH:] == EOS).any(), "a row ended early: not this test's case"
    output = guarded_generate(model, inject_oom, 3, input_ids, attention_mask=mask, **GREEDY)
    assert torch.equal(output, reference)


def test_gpt2_generate_with_sampling_is_split_and_not_refused(inject_oom: Inject) -> None:
    model = gpt2_model()
    input_ids, mask = left_padded()
    inject_oom(model.transformer, 3)
    guarded = torchmemguard.guard(model)
    torch.manual_seed(0)
    with torch.no_grad():
        output = guarded.generate(input_ids, attention_mask=mask, do_sample=True, max_new_tokens=6)
    # Sampling draws other numbers when rows run again: the row check cannot tell chance
    # from rows that depend on each other, so it leaves the call unchecked, unrefused.
    assert guarded.generate.oom_guard.stats.split_calls == 1
    assert guarded.generate.oom_guard.refusal is None
    assert torch.equal(output[:, : input_ids.shape[1]], input_ids)


def test_gpt2_generate_with_chunks_ending_early_equals_whole_batch(inject_oom: Inject) -> None:
    model = gpt2_model()
    input_ids, mask = left_padded()
    eos = eos_of_second_half(model, input_ids, mask)
    with torch.no_grad():
        reference = model.generate(input_ids, attention_mask=mask, eos_token_id=eos, **GREEDY)
    half = len(LENGTHS) // 2
    # The second half stops after one token and is padded; the first half runs on.
    assert (reference[half:, WIDTH + 1 :] == PAD).all()
    assert (reference[:half, -1] != PAD).any()
    output = guarded_generate(
        model, inject_oom, half, input_ids, attention_mask=mask, eos_token_id=eos, **GREEDY
    )
    assert torch.equal(output, reference)


def test_gpt2_generate_without_pad_token_pads_early_chunks_with_the_first_eos(
    inject_oom: Inject,
) -> None:
    model = gpt2_model(pad_token_id=None)
    input_ids, mask = left_padded()
    eos = eos_of_second_half(model, input_ids, mask)
    with torch.no_grad():
        reference = model.generate(input_ids, attention_mask=mask, eos_token_id=eos, **GREEDY)
    half = len(LENGTHS) // 2
    assert (reference[half:, WIDTH + 1 :] == eos[0]).all()
    output = guarded_generate(
        model, inject_oom, half, input_ids, attention_mask=mask, eos_token_id=eos, **GREEDY
    )
    assert torch.equal(output, reference)


def test_gpt2_generate_dict_with_cache_raises_merge_error_naming_the_cache(
    inject_oom: Inject,
) -> None:
    model = gpt2_model()
    input_ids, mask = left_padded()
    inject_oom(model.transformer, 3)
    guarded = torchmemguard.guard(model)
    with torch.no_grad(), pytest.raises(torchmemguard.MergeError, match="cache"):
        guarded.generate(input_ids, attention_mask=mask, return_dict_in_generate=True, **GREEDY)


SCORED = {"return_dict_in_generate": True, "use_cache": False, "output_scores": True}


def test_gpt2_generate_dict_without_cache_merges_sequences_and_scores(inject_oom: Inject) -> None:
    model = gpt2_model()
    input_ids, mask = left_padded()
    with torch.no_grad():
        reference = model.generate(input_ids, attention_mask=mask, **SCORED, **GREEDY)
    assert not (reference.sequences[:, WIDTH:] == EOS).any()
    inject_oom(model.transformer, 3)
    guarded = torchmemguard.guard(model)
    with torch.no_grad():
        output = guarded.generate(input_ids, attention_mask=mask, **SCORED, **GREEDY)
    assert guarded.generate.oom_guard.stats.split_calls >= 1
    assert type(output) is type(reference)
    assert torch.equal(output.sequences, reference.sequences)
    assert len(output.scores) == len(reference.scores) == GREEDY["max_new_tokens"]
    for step, (actual, expected) in enumerate(zip(output.scores, reference.scores, strict=True)):
        assert close(actual, expected), f"scores differ at step {step}"


def test_gpt2_generate_dict_with_chunks_of_different_step_counts_raises_merge_error(
    inject_oom: Inject,
) -> None:
    model = gpt2_model()
    input_ids, mask = left_padded()
    eos = eos_of_second_half(model, input_ids, mask)
    inject_oom(model.transformer, len(LENGTHS) // 2)
    guarded = torchmemguard.guard(model)
    with torch.no_grad(), pytest.raises(torchmemguard.MergeError, match="scores"):
        guarded.generate(input_ids, attention_mask=mask, eos_token_id=eos, **SCORED, **GREEDY)


BEAMS = {"num_beams": 3, "num_return_sequences": 2, "do_sample": False, "max_new_tokens": 6}


def test_gpt2_beam_search_with_several_sequences_per_prompt_equals_whole_batch(
    inject_oom: Inject,
) -> None:
    model = gpt2_model()
    input_ids, mask = left_padded()
    with torch.no_grad():
        reference = model.generate(input_ids, attention_mask=mask, **BEAMS)
    assert reference.shape[0] == 2 * len(LENGTHS)
    # Three prompts at a time, beams and all, fit: the call runs in two chunks.
    output = guarded_generate(model, inject_oom, 3 * 3, input_ids, attention_mask=mask, **BEAMS)
    assert torch.equal(output, reference)


def test_gpt2_beam_search_asked_for_a_dict_is_refused_for_its_beam_indices(
    inject_oom: Inject,
) -> None:
    model = gpt2_model()
    input_ids, mask = left_padded()
    asked = {**BEAMS, "return_dict_in_generate": True, "use_cache": False}
    inject_oom(model.transformer, 3 * 3)
    guarded = torchmemguard.guard(model)
    with torch.no_grad(), pytest.raises(torchmemguard.MergeError) as refused:
        guarded.generate(input_ids, attention_mask=mask, **asked)
    assert "output.beam_indices" in str(refused.value)
    assert "return_dict_in_generate=False" in str(refused.value)


def test_a_refused_generate_advises_what_the_call_did_not_already_do(inject_oom: Inject) -> None:
    model = gpt2_model()
    input_ids, mask = left_padded()
    eos = eos_of_second_half(model, input_ids, mask)
    inject_oom(model.transformer, len(LENGTHS) // 2)
    guarded = torchmemguard.guard(model, merge=None)
    with torch.no_grad(), pytest.raises(torchmemguard.MergeError) as refused:
        guarded.generate(input_ids, attention_mask=mask, eos_token_id=eos, **SCORED, **GREEDY)
    assert "return_dict_in_generate=False" in str(refused.value)


# ---------------------------------------------------------------------------
# An encoder-decoder generate()


def test_bart_generate_equals_whole_batch_after_an_oom_in_the_encoder(inject_oom: Inject) -> None:
    model = bart_model()
    input_ids, mask = right_padded()
    with torch.no_grad():
        reference = model.generate(input_ids, attention_mask=mask, num_beams=1, **GREEDY)
    assert reference.shape[1] == 1 + GREEDY["max_new_tokens"]
    assert not (reference[:, 1:] == EOS).any(), "a row ended early: not this test's case"
    assert len({tuple(row) for row in reference.tolist()}) > 1, "every row is the same"
    hook = inject_oom(model.get_encoder(), 3)
    guarded = torchmemguard.guard(model)
    with torch.no_grad():
        output = guarded.generate(input_ids, attention_mask=mask, num_beams=1, **GREEDY)
    assert hook.sizes[:2] == [len(LENGTHS), 3]
    assert torch.equal(output, reference)


def test_bart_generate_with_chunks_ending_early_equals_whole_batch(inject_oom: Inject) -> None:
    model = bart_model()
    input_ids, mask = right_padded()
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=mask, do_sample=False, max_new_tokens=1)
    half = len(LENGTHS) // 2
    eos = out[half:, -1].tolist()
    with torch.no_grad():
        reference = model.generate(
            input_ids, attention_mask=mask, eos_token_id=eos, num_beams=1, **GREEDY
        )
    assert (reference[half:, 2:] == PAD).all()
    assert (reference[:half, -1] != PAD).any()
    inject_oom(model.get_encoder(), half)
    guarded = torchmemguard.guard(model)
    with torch.no_grad():
        output = guarded.generate(
            input_ids, attention_mask=mask, eos_token_id=eos, num_beams=1, **GREEDY
        )
    assert guarded.generate.oom_guard.stats.split_calls >= 1
    assert torch.equal(output, reference)


# ---------------------------------------------------------------------------
# Pipelines


def test_text_generation_pipeline_with_a_guarded_model_equals_unguarded(inject_oom: Inject) -> None:
    model, tok = gpt2_model(), tokenizer(padding_side="left")
    options = {"batch_size": 4, "do_sample": False, "max_new_tokens": 4}
    reference = transformers.pipeline("text-generation", model=model, tokenizer=tok)(
        TEXTS, **options
    )
    inject_oom(model.transformer, 2)
    guarded = torchmemguard.guard(model)
    output = transformers.pipeline("text-generation", model=guarded, tokenizer=tok)(
        TEXTS, **options
    )
    assert guarded.generate.oom_guard.stats.ooms >= 1
    assert output == reference


def test_feature_extraction_pipeline_with_a_guarded_model_equals_unguarded(
    inject_oom: Inject,
) -> None:
    bert, tok = bert_model(), tokenizer()
    options = {"batch_size": 4, "return_tensors": True}
    reference = transformers.pipeline("feature-extraction", model=bert, tokenizer=tok)(
        TEXTS, **options
    )
    inject_oom(bert.embeddings, 2)
    guarded = torchmemguard.guard(bert)
    output = transformers.pipeline("feature-extraction", model=guarded, tokenizer=tok)(
        TEXTS, **options
    )
    assert guarded.oom_guard.stats.ooms >= 1
    assert len(output) == len(reference) == len(TEXTS)
    for text, actual, expected in zip(TEXTS, output, reference, strict=True):
        assert actual.shape == expected.shape, text
        assert close(actual, expected), text


# ---------------------------------------------------------------------------
# A training step


def training_step(model: torch.nn.Module) -> Callable[..., torch.Tensor]:
    def step(
        input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        out.loss.backward()
        loss: torch.Tensor = out.loss.detach()
        return loss

    return step


def lm_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    input_ids, mask = right_padded()
    labels = input_ids.masked_fill(mask == 0, -100)
    return input_ids, mask, labels


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {
        name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()
    }


def test_training_step_with_an_oom_in_forward_raises_oom_error_naming_backward(
    inject_oom: Inject,
) -> None:
    model = gpt2_model().train()
    inject_oom(model.transformer, 2)
    step = torchmemguard.oom_safe(training_step(model))
    with pytest.raises(torchmemguard.OutOfMemoryError, match=r"calls backward\(\)"):
        step(*lm_batch())
    assert step.oom_guard.runs_backward


def test_training_step_with_an_oom_in_forward_leaves_every_gradient_none(
    inject_oom: Inject,
) -> None:
    model = gpt2_model().train()
    inject_oom(model.transformer, 2)
    step = torchmemguard.oom_safe(training_step(model))
    with pytest.raises(torchmemguard.OutOfMemoryError):
        step(*lm_batch())
    assert all(grad is None for grad in gradients(model).values())


def test_training_step_with_an_oom_in_backward_keeps_only_the_failed_attempts_gradients() -> None:
    # The OOM comes from the backward of the first block: the final norm and the
    # second block have their gradients by then; the first block and the
    # embeddings (tied to the head, so summed last) have none.
    def run(guarded: bool) -> dict[str, torch.Tensor | None]:
        model = gpt2_model().train()

        def backward_oom(module: torch.nn.Module, grad_output: Any) -> None:
            if grad_output[0].shape[0] > 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        model.transformer.h[0].register_full_backward_pre_hook(backward_oom)
        step = training_step(model)
        if guarded:
            step = torchmemguard.oom_safe(step)
        error = torchmemguard.OutOfMemoryError if guarded else torch.OutOfMemoryError
        with pytest.raises(error):
            step(*lm_batch())
        return gradients(model)

    plain, guarded = run(guarded=False), run(guarded=True)
    assert any(grad is None for grad in plain.values())
    assert any(grad is not None for grad in plain.values())
    assert plain.keys() == guarded.keys()
    for name, expected in plain.items():
        actual = guarded[name]
        if expected is None:
            assert actual is None, name
        else:
            assert actual is not None, name
            assert torch.equal(actual, expected), name


def test_training_step_without_an_oom_gives_the_plain_steps_gradients() -> None:
    plain_model, guarded_model = gpt2_model().train(), gpt2_model().train()
    batch = lm_batch()
    plain_loss = training_step(plain_model)(*batch)
    step = torchmemguard.oom_safe(training_step(guarded_model))
    guarded_loss = step(*batch)
    assert torch.equal(guarded_loss, plain_loss)
    plain, guarded = gradients(plain_model), gradients(guarded_model)
    assert all(grad is not None for grad in plain.values())
    for name, expected in plain.items():
        assert torch.equal(guarded[name], expected), name
    assert step.oom_guard.stats.ooms == 0


def test_training_step_runs_whole_after_the_guard_learned_it_calls_backward(
    inject_oom: Inject,
) -> None:
    plain_model, guarded_model = gpt2_model().train(), gpt2_model().train()
    batch = lm_batch()
    training_step(plain_model)(*batch)
    hook = inject_oom(guarded_model.transformer, 2)
    step = torchmemguard.oom_safe(training_step(guarded_model))
    with pytest.raises(torchmemguard.OutOfMemoryError):
        step(*batch)
    hook.limit = len(LENGTHS)  # memory is back
    hook.sizes.clear()
    guarded_model.zero_grad(set_to_none=True)
    step(*batch)
    assert hook.sizes == [len(LENGTHS)]
    for name, expected in gradients(plain_model).items():
        assert torch.equal(gradients(guarded_model)[name], expected), name
