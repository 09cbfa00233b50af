"""torchmemguard_model_bytes: what each guarded module holds, by device."""

from __future__ import annotations

import gc

import pytest
import torch
from prometheus_client import CollectorRegistry

import torchmemguard
from torchmemguard._observability import footprint, metrics


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> CollectorRegistry:
    monkeypatch.setattr(metrics, "_installed", {})
    monkeypatch.setattr(metrics, "_functions", set())
    monkeypatch.setattr(metrics, "_devices", set())
    registry = CollectorRegistry()
    torchmemguard.install_metrics(registry)
    return registry


def model_bytes(registry: CollectorRegistry, function: str, device: str = "cpu") -> float | None:
    return registry.get_sample_value(
        "torchmemguard_model_bytes", {"function": function, "device": device}
    )


class Tied(torch.nn.Module):
    """An embedding whose weight the output layer shares, and a normalisation's buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(100, 16)  # 6400 bytes
        self.norm = torch.nn.BatchNorm1d(16)  # 2 x 64 bytes of parameters, 2 x 64 + 8 of buffers
        self.out = torch.nn.Linear(16, 100, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.embed(x)))


def test_each_guarded_module_reports_its_own_parameters_and_buffers(
    registry: CollectorRegistry,
) -> None:
    # Held in locals: a module that is garbage-collected reports 0.
    _linear = torchmemguard.guard(torch.nn.Linear(1000, 250))  # 250,000 + 250 floats
    _tied = torchmemguard.guard(Tied())
    assert model_bytes(registry, "Linear.forward") == 250_250 * 4
    assert model_bytes(registry, "Tied.forward") == 6400 + 4 * 64 + 8  # the tied weight once


def test_the_entry_points_of_one_module_report_it_once(registry: CollectorRegistry) -> None:
    guarded = torchmemguard.guard(Tied(), methods=["extra_repr"])
    for _ in range(10):  # past the first sampled call of each guard
        guarded(torch.zeros(2, dtype=torch.long))
        guarded.extra_repr()
    names = {
        sample.labels["function"]
        for family in registry.collect()
        if family.name == "torchmemguard_model_bytes"
        for sample in family.samples
    }
    assert names == {"Tied.forward"}


def test_a_module_moved_after_it_was_guarded_is_seen_where_it_went(
    registry: CollectorRegistry,
) -> None:
    guarded = torchmemguard.guard(torch.nn.Linear(10, 10))
    assert model_bytes(registry, "Linear.forward") == 110 * 4
    guarded.to(torch.float64)
    for _ in range(8):  # the eighth call is sampled
        guarded(torch.zeros(1, 10, dtype=torch.float64))
    assert model_bytes(registry, "Linear.forward") == 110 * 8
    guarded.to("meta")  # a device that holds no memory
    footprint.report(guarded.__wrapped__)
    assert model_bytes(registry, "Linear.forward") == 0


def test_a_module_that_was_garbage_collected_holds_nothing(registry: CollectorRegistry) -> None:
    guarded = torchmemguard.guard(torch.nn.Linear(10, 10))
    assert model_bytes(registry, "Linear.forward") == 110 * 4
    del guarded
    gc.collect()
    assert model_bytes(registry, "Linear.forward") == 0


def test_the_bytes_are_those_of_each_storage_once() -> None:
    model = Tied()
    assert footprint.held(model) == {torch.device("cpu"): 6400 + 4 * 64 + 8}
