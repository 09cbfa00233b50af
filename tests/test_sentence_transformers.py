"""sentence-transformers under the guard: ``encode()`` and its variants, and the inner
transformers model reached through ``forward``.

The model is a tiny BERT built from a config and saved, with a word-level
tokenizer, to a temporary folder that ``SentenceTransformer`` loads: no weights
are downloaded. An inner module runs out of memory above a number of rows
(tests/test_transformers.py's ``inject_oom``), or a child process runs under a
real cap. The reference is always the same model's own answer to the whole
batch, and floats are compared as in tests/test_transformers.py.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

import torchmemguard
from tests.realcap import address_space_cap, describe_error, prepare_child, run_child

sentence_transformers = pytest.importorskip("sentence_transformers")

from tests.test_transformers import (  # noqa: E402
    ATOL,
    RTOL,
    TEXTS,
    Inject,
    bert_model,
    inject_oom,
    tokenizer,
)

__all__ = ["inject_oom"]  # the fixture, used by name

_HERE = "tests.test_sentence_transformers"

# The whole list of 256 texts takes about 190 MiB to encode in one inner batch; a
# quarter fits in 64 MiB.
ENCODE_HEADROOM_MIB = 64
# The tokenizer's own threads would allocate in arenas of their own, at times that
# vary from run to run: where the whole call runs out would vary with them.
ONE_THREAD = {"TOKENIZERS_PARALLELISM": "false"}


def sentence_model(folder: str) -> Any:
    """A SentenceTransformer of a tiny BERT with mean pooling, saved to ``folder``."""
    bert_model().save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return sentence_transformers.SentenceTransformer(folder, device="cpu")


@pytest.fixture
def model() -> Iterator[Any]:
    with tempfile.TemporaryDirectory() as folder:
        yield sentence_model(folder)


def bert_of(model: Any) -> torch.nn.Module:
    """The transformers model inside a SentenceTransformer."""
    inner: torch.nn.Module = model[0].model
    return inner


def encoder_of(model: Any) -> torch.nn.Module:
    """Where the OOM is injected: the BERT's encoder, which its forward calls as a module
    (sentence-transformers calls the BERT's forward itself, which skips its hooks)."""
    encoder: torch.nn.Module = bert_of(model).encoder
    return encoder


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"convert_to_tensor": True},
        {"normalize_embeddings": True},
        {"batch_size": 2},
    ],
    ids=["numpy", "tensor", "normalized", "small-inner-batches"],
)
def test_guarded_encode_equals_the_whole_batch_after_an_oom(
    model: Any, inject_oom: Inject, options: dict[str, Any]
) -> None:
    reference = model.encode(TEXTS, **options)
    inject_oom(encoder_of(model), 3)
    guarded = torchmemguard.guard(model)
    output = guarded.encode(TEXTS, **options)
    assert type(output) is type(reference)
    np.testing.assert_allclose(np.asarray(output), np.asarray(reference), rtol=RTOL, atol=ATOL)
    if options.get("batch_size", 32) > 3:
        assert guarded.encode.oom_guard.stats.split_calls == 1
    else:  # encode's own batches fit: nothing to do
        assert guarded.encode.oom_guard.stats.ooms == 0


def test_every_output_as_a_dict_per_text_is_refused_and_never_split(
    model: Any, inject_oom: Inject
) -> None:
    # Each text's token tensors are padded to the longest text of encode's inner batch:
    # a chunk's inner batch pads to another length, so a split cannot equal the whole.
    guarded = torchmemguard.guard(model)
    hook = inject_oom(encoder_of(model), 3)
    guarded.encode(TEXTS)  # a limit learned for 8 texts
    hook.sizes.clear()
    with pytest.raises(torchmemguard.SplitRefusedError, match=r"output_value='sentence_embedding'"):
        guarded.encode(TEXTS, output_value=None)
    assert hook.sizes == [len(TEXTS)]
    hook.limit = 100
    hook.sizes.clear()
    whole = guarded.encode(TEXTS, output_value=None)
    assert hook.sizes == [len(TEXTS)]  # whole, the limit learned notwithstanding
    reference = model.encode(TEXTS, output_value=None)
    for got, expected in zip(whole, reference, strict=True):
        assert torch.equal(got["token_embeddings"], expected["token_embeddings"])


@pytest.mark.parametrize("method", ["encode_query", "encode_document"])
def test_the_variants_of_encode_are_guarded_by_default(
    model: Any, inject_oom: Inject, method: str
) -> None:
    reference = getattr(model, method)(TEXTS)
    inject_oom(encoder_of(model), 3)
    guarded = torchmemguard.guard(model)
    output = getattr(guarded, method)(TEXTS)
    np.testing.assert_allclose(output, reference, rtol=RTOL, atol=ATOL)
    assert getattr(guarded, method).oom_guard.stats.split_calls == 1
    assert getattr(guarded, method).oom_guard.name == f"SentenceTransformer.{method}"


def test_the_inner_model_guarded_is_reached_through_forward(model: Any, inject_oom: Inject) -> None:
    reference = model.encode(TEXTS)
    inject_oom(encoder_of(model), 3)
    inner = torchmemguard.guard(bert_of(model))
    model[0].model = inner
    output = model.encode(TEXTS)
    np.testing.assert_allclose(output, reference, rtol=RTOL, atol=ATOL)
    assert inner.oom_guard.stats.split_calls == 1


def test_quantized_embeddings_calibrated_on_the_batch_are_refused(
    model: Any, inject_oom: Inject
) -> None:
    # int8 ranges come from the batch's own embeddings: a chunk's would differ.
    inject_oom(encoder_of(model), 3)
    guarded = torchmemguard.guard(model)
    with pytest.raises(torchmemguard.SplitRefusedError, match="depend on each other"):
        guarded.encode(TEXTS, precision="int8")


# ---------------------------------------------------------------------------
# Under a real cap


def _scenario_encode(headroom_mib: float, unguarded: bool) -> dict[str, Any]:
    prepare_child()
    import tokenizers
    import transformers

    import torchmemguard

    words = [f"w{i}" for i in range(997)]
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=512,
        max_position_embeddings=160,
    )
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, 129, (256,), generator=generator).tolist()
    picks = torch.randint(0, len(words), (sum(lengths),), generator=generator).tolist()
    texts, at = [], 0
    for length in lengths:
        texts.append(" ".join(words[i] for i in picks[at : at + length]))
        at += length
    with tempfile.TemporaryDirectory() as folder:
        transformers.BertModel(config).eval().save_pretrained(folder)
        transformers.PreTrainedTokenizerFast(
            tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]"
        ).save_pretrained(folder)
        model = sentence_transformers.SentenceTransformer(folder, device="cpu")
    model.encode(texts[:2])  # a warm-up; the reference comes after the cap, so that
    # the heap holds no free memory from a whole call that the capped calls could reuse
    if unguarded:
        with address_space_cap(headroom_mib):
            try:
                model.encode(texts, batch_size=len(texts))
                return {"unguarded": None}
            except RuntimeError as exc:
                return {"unguarded": describe_error(exc)}
    guarded = torchmemguard.guard(model)
    outputs: list[Any] = []
    ooms: list[int] = []
    with address_space_cap(headroom_mib):
        for _ in range(2):
            # One inner batch for the whole list, as a service tuned for throughput asks.
            outputs.append(guarded.encode(texts, batch_size=len(texts)))
            ooms.append(guarded.encode.oom_guard.stats.ooms)
    reference = model.encode(texts, batch_size=len(texts))
    return {
        "types": [type(out).__name__ for out in outputs],
        "equal": [bool(np.allclose(out, reference, rtol=RTOL, atol=ATOL)) for out in outputs],
        "ooms": ooms,
    }


@pytest.mark.slow
def test_the_cap_makes_the_unguarded_encode_fail_with_a_real_oom() -> None:
    run = run_child(f"{_HERE}:_scenario_encode", ENCODE_HEADROOM_MIB, True, env=ONE_THREAD)
    assert run["unguarded"] is not None, run
    assert run["unguarded"]["is_oom"], run


@pytest.mark.slow
def test_guarded_encode_under_a_real_cap_equals_the_whole_batch_call_after_call() -> None:
    run = run_child(f"{_HERE}:_scenario_encode", ENCODE_HEADROOM_MIB, False, env=ONE_THREAD)
    assert run["types"] == ["ndarray", "ndarray"], run
    assert run["equal"] == [True, True], run
    assert run["ooms"][0] >= 1, run
