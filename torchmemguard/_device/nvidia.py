"""GPU utilisation and temperature from NVIDIA's management library, where installed."""

from __future__ import annotations

import logging
import threading
from types import ModuleType
from typing import Any

import torch

logger = logging.getLogger("torchmemguard")


class Nvml:
    """NVIDIA's management library, where ``nvidia-ml-py`` is installed; started on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._module: ModuleType | None = None
        self._tried = False
        self._handles: dict[int, Any] = {}

    def module(self) -> ModuleType | None:
        """``pynvml``, started; ``None`` where it is not installed or did not start."""
        with self._lock:
            if not self._tried:
                self._tried = True
                try:
                    import pynvml  # type: ignore[import-not-found, unused-ignore]

                    pynvml.nvmlInit()
                    self._module = pynvml
                except ImportError:
                    pass
                except Exception as exc:
                    logger.warning("NVML is installed but did not start: %s", exc)
            return self._module

    def signals(self, index: int) -> tuple[float, float] | None:
        """GPU utilisation (0 to 1) and temperature (°C) of CUDA device ``index``."""
        nvml = self.module()
        if nvml is None:
            return None
        handle = self._handles.get(index)
        if handle is None:
            # NVML numbers devices its own way: match them by UUID, which
            # also holds under CUDA_VISIBLE_DEVICES.
            uuid = torch.cuda.get_device_properties(index).uuid
            handle = self._handles[index] = nvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        utilization = nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100
        temperature = nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
        return float(utilization), float(temperature)
