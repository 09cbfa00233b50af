"""Guard the ``generate()`` of a transformers model.

The prompts and every per-sample tensor are split like any batch; options
such as ``eos_token_id=[2, 3]`` go whole. The chunks stop generating at their
own lengths, so their sequences are padded on the right, where a whole-batch
generation pads the sequences that finished early, with the pad token that the
generation uses: ``pad_token_id`` if given or configured, else the first
end-of-sequence token, as transformers does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from torchmemguard._guarded import Guard
from torchmemguard._knowledge import knowledge_of
from torchmemguard._merging import Merger
from torchmemguard._options import Options

# The whole output when generate() returns a tensor, and its sequences otherwise.
_SEQUENCES = frozenset({"output", "output.sequences"})

# Arguments of generate() that are never per sample, beside the generation
# config's own fields.
_OPTIONS = (
    "generation_config",
    "logits_processor",
    "stopping_criteria",
    "prefix_allowed_tokens_fn",
    "synced_gpus",
    "assistant_model",
    "streamer",
    "custom_generate",
    "tokenizer",
)


# Outputs that chunks cannot make: a beam's index counts the beams of every prompt
# before it in the batch, and a chunk's count starts again from its first prompt.
_REFUSED = {
    "output.beam_indices": "beam indices count the beams of the whole batch, and the "
    "chunks' would count from their own first prompt.",
}

# What to do instead, when the chunks' outputs cannot make the whole batch's.
_WHOLE = "Call generate() on batches that fit whole."
_ASK = "Ask generate() for its sequences alone (return_dict_in_generate=False), or call it on "
_ASK += "batches that fit whole."


class GenerateGuard(Guard):
    """The guard of one module's ``generate()``."""

    def __init__(self, module: torch.nn.Module, options: Options) -> None:
        config = getattr(module, "generation_config", None)
        fields = tuple(vars(config)) if config is not None else ()
        options = dataclasses.replace(
            options,
            batch_args=None,
            whole_args=tuple(dict.fromkeys(_OPTIONS + fields)),
            merge=None,
        )
        generate: Callable[..., Any] = module.generate  # type: ignore[assignment]
        name = f"{type(module).__qualname__}.generate"
        known = knowledge_of(module, "generate", options)
        super().__init__(generate, options, module=module, lists=False, name=name, known=known)

    def merger_for(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Merger:
        asked = _setting(self.module, kwargs, "return_dict_in_generate")
        return Merger(
            pad_value=_pad_token(self.module, kwargs),
            pad_paths=_SEQUENCES,
            advice=_ASK if asked else _WHOLE,
            rows_per_sample=int(_setting(self.module, kwargs, "num_return_sequences") or 1),
            refused=_REFUSED,
        )


def _setting(module: Any, kwargs: dict[str, Any], name: str) -> Any:
    """The value of the generation setting ``name`` for a call with these arguments: as
    passed, else in the generation config passed or the model's own."""
    if name in kwargs:
        return kwargs[name]
    config = kwargs.get("generation_config") or getattr(module, "generation_config", None)
    return getattr(config, name, None)


def _pad_token(module: Any, kwargs: dict[str, Any]) -> int | None:
    """The token that generate() pads finished sequences with, for these arguments."""
    token = _setting(module, kwargs, "pad_token_id")
    if token is None:
        token = _setting(module, kwargs, "eos_token_id")
        if isinstance(token, torch.Tensor):
            token = token.flatten().tolist()
        if isinstance(token, (list, tuple)):
            token = token[0] if token else None
    return None if token is None else int(token)
