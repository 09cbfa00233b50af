"""Where the batch lies in a call's tensors: dimension 0, or another one.

PyTorch's recurrent and transformer modules take sequence-first tensors,
(time, batch, features), unless built with ``batch_first=True``, and an LSTM's
states put the batch on dimension 1 either way. A :class:`Layout` says, for
each argument and each output, which dimension holds the batch. The guard
moves that dimension to the front of the inputs to split them (a view, no
copy) and back for each chunk, and concatenates the outputs along it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from torchmemguard._structures import children, rebuild


@dataclass(frozen=True)
class Layout:
    """The batch dimension of each argument and output of one callable.

    ``dim`` holds for anything not named. ``args`` gives an argument's own
    dimension, or None for an argument shared by every sample (an attention
    mask), which goes whole. ``ndim`` gives the number of dimensions of an
    argument that holds a batch: a tensor of another rank (an unbatched input)
    cannot be split. ``outputs`` gives the dimension of an output by its path
    (``output[1]``), the longest prefix that matches winning.
    """

    dim: int = 0
    args: Mapping[str, int | None] = field(default_factory=dict)
    ndim: Mapping[str, int] = field(default_factory=dict)
    outputs: Mapping[str, int] = field(default_factory=dict)

    @property
    def whole(self) -> tuple[str, ...]:
        """The arguments that go whole to every chunk."""
        return tuple(name for name, dim in self.args.items() if dim is None)

    def problem(self, label: str, value: Any) -> str | None:
        """What keeps the argument ``label`` from being split, if anything."""
        rank = self.ndim.get(label)
        if rank is None or value is None:
            return None
        if isinstance(value, torch.Tensor) and value.dim() == rank:
            return None
        found = f"{value.dim()} dimensions" if isinstance(value, torch.Tensor) else "a "
        found += "" if isinstance(value, torch.Tensor) else type(value).__qualname__
        return (
            f"{label!r} is {found}, where a batch of it has {rank}: an unbatched input or a "
            "packed sequence, which cannot be split; pass a padded batch"
        )

    def inward(self, label: str, value: Any) -> Any:
        """``value`` with its batch on dimension 0."""
        dim = self.args.get(label, self.dim)
        return value if not dim else _moved(value, dim, 0)

    def outward(self, label: str, value: Any) -> Any:
        """A chunk of ``value`` (batch on dimension 0) put back in the argument's layout."""
        dim = self.args.get(label, self.dim)
        return value if not dim else _moved(value, 0, dim)

    def output_dim(self, path: str) -> int:
        """The batch dimension of the output at ``path``."""
        best, found = -1, self.dim
        for prefix, dim in self.outputs.items():
            inside = path == prefix or path.startswith((f"{prefix}[", f"{prefix}."))
            if inside and len(prefix) > best:
                best, found = len(prefix), dim
        return found


PLAIN = Layout()


def _moved(value: Any, source: int, target: int) -> Any:
    """``value`` with dimension ``source`` of each tensor inside it moved to ``target``;
    tensors with too few dimensions to hold it are left as they are."""
    if isinstance(value, torch.Tensor):
        return value.movedim(source, target) if value.dim() > max(source, target) else value
    if isinstance(value, list):
        return [_moved(item, source, target) for item in value]
    items = children(value)
    if items is None:
        return value
    return rebuild(value, [_moved(item, source, target) for item in items])


def layout_of(module: torch.nn.Module, batch_dim: int | None) -> Layout:
    """The layout of ``module``'s calls: ``batch_dim`` everywhere when given; else the
    layout of PyTorch's own recurrent and transformer modules, from their
    ``batch_first``; else dimension 0."""
    if batch_dim is not None:
        return Layout(dim=batch_dim)
    nn = torch.nn
    if isinstance(module, nn.RNNBase):
        sequence = 0 if module.batch_first else 1
        # The states (h, and c for an LSTM) are (layers, batch, hidden) either way.
        return Layout(
            dim=sequence,
            args={"hx": 1},
            ndim={"input": 3},
            outputs={"output[0]": sequence, "output[1]": 1},
        )
    if isinstance(
        module,
        (
            nn.MultiheadAttention,
            nn.Transformer,
            nn.TransformerEncoder,
            nn.TransformerDecoder,
            nn.TransformerEncoderLayer,
            nn.TransformerDecoderLayer,
        ),
    ):
        attention = next(m for m in module.modules() if isinstance(m, nn.MultiheadAttention))
        sequence = 0 if attention.batch_first else 1
        args: dict[str, int | None] = {}
        ndim: dict[str, int] = {}
        for name in _parameters(module):
            if name.endswith("key_padding_mask"):
                args[name], ndim[name] = 0, 2  # (batch, source) in every layout
            elif name.endswith("mask"):
                args[name] = None  # (target, source): shared by every sample
            elif name in ("src", "tgt", "memory", "query", "key", "value"):
                ndim[name] = 3
        # MultiheadAttention also returns its weights, (batch, target, source).
        return Layout(dim=sequence, args=args, ndim=ndim, outputs={"output[1]": 0})
    return PLAIN


def _parameters(module: torch.nn.Module) -> list[str]:
    code = type(module).forward.__code__
    return list(code.co_varnames[1 : code.co_argcount])
