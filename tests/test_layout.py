"""Where the batch lies: PyTorch's sequence-first modules and ``batch_dim``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import torchmemguard
from tests.conftest import ScarceModule, oom_above
from torchmemguard import SplitRefusedError

# The out-of-memory errors here are raised by the tests and take no memory.
pytestmark = pytest.mark.usefixtures("unmeasured")


def test_a_time_major_lstm_is_split_along_its_batch_and_exact() -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(8, 16, num_layers=2).double()  # batch_first=False: (time, batch, features)
    model = torchmemguard.guard(lstm)
    x = torch.randn(7, 40, 8, dtype=torch.float64)
    h0 = torch.randn(2, 40, 16, dtype=torch.float64)
    c0 = torch.randn(2, 40, 16, dtype=torch.float64)
    with torch.no_grad():
        expected, (h, c) = lstm(x, (h0, c0))
    sizes: list[int] = []

    def scarce(module: nn.Module, args: tuple[Any, ...]) -> None:
        sizes.append(args[0].shape[1])
        oom_above(10, args[0].shape[1])

    lstm.register_forward_pre_hook(scarce)
    with torch.no_grad():
        out, (h_out, c_out) = model(x, (h0, c0))
    assert sizes[:3] == [40, 20, 10]
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_out, h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c_out, c, rtol=1e-12, atol=1e-12)
    assert out.is_contiguous()


def test_a_batch_first_gru_keeps_its_state_on_dimension_one() -> None:
    torch.manual_seed(0)
    gru = nn.GRU(4, 6, batch_first=True).double()
    x = torch.randn(12, 5, 4, dtype=torch.float64)
    with torch.no_grad():
        expected, h = gru(x)
    gru.register_forward_pre_hook(lambda m, args: oom_above(4, args[0].shape[0]))
    with torch.no_grad():
        out, h_out = torchmemguard.guard(gru)(x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_out, h, rtol=1e-12, atol=1e-12)


def test_a_sequence_first_transformer_encoder_is_split_along_its_batch() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0)  # (sequence, batch, features)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).double().eval()
    x = torch.randn(9, 24, 16, dtype=torch.float64)
    padding = torch.zeros(24, 9, dtype=torch.bool)
    padding[::3, 6:] = True
    causal = torch.ones(9, 9, dtype=torch.bool).triu(1)
    with torch.no_grad():
        expected = encoder(x, mask=causal, src_key_padding_mask=padding)
    encoder.register_forward_pre_hook(lambda m, args: oom_above(8, args[0].shape[1]))
    with torch.no_grad():
        out = torchmemguard.guard(encoder)(x, mask=causal, src_key_padding_mask=padding)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_sequence_first_multihead_attention_returns_its_weights_batch_first() -> None:
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 2).double().eval()
    q = torch.randn(5, 12, 8, dtype=torch.float64)
    with torch.no_grad():
        expected, weights = attention(q, q, q)
    attention.register_forward_pre_hook(lambda m, args: oom_above(4, args[0].shape[1]))
    with torch.no_grad():
        out, out_weights = torchmemguard.guard(attention)(q, q, q)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out_weights, weights, rtol=1e-10, atol=1e-10)


class Encoder(nn.Module):
    """A time-major LSTM's outputs, without its states."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 8).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lstm(x)[0]
        return out


def test_a_time_major_lstm_inside_a_container_is_refused_not_split_along_time() -> None:
    torch.manual_seed(0)
    model = ScarceModule(Encoder(), limit=4)
    x = torch.randn(12, 3, 4, dtype=torch.float64)  # (time, batch, features)
    with torch.no_grad(), pytest.raises(SplitRefusedError, match="depend on each other"):
        torchmemguard.guard(model)(x)


def test_batch_dim_splits_a_container_of_a_time_major_lstm_exactly() -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 8).double()
    model = ScarceModule(lstm, limit=4, dim=1)
    x = torch.randn(12, 10, 4, dtype=torch.float64)
    with torch.no_grad():
        expected, (h, _) = lstm(x)
        out, (h_out, _) = torchmemguard.guard(model, batch_dim=1)(x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_out, h, rtol=1e-12, atol=1e-12)


def test_an_unbatched_input_to_an_lstm_is_refused_by_name() -> None:
    lstm = nn.LSTM(4, 8)
    lstm.register_forward_pre_hook(lambda m, args: oom_above(0, 1))
    with pytest.raises(torchmemguard.BatchError, match="'input' is 2 dimensions"):
        torchmemguard.guard(lstm)(torch.randn(12, 4))
