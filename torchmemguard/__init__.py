"""torchmemguard: keep PyTorch calls alive when a batch does not fit in memory."""

from torchmemguard.budget import Budget, current_budget, memory_budget
from torchmemguard.classify import is_oom, register_oom_matcher, unregister_oom_matcher
from torchmemguard.decorators import guard, oom_safe
from torchmemguard.errors import (
    BatchError,
    BudgetExceededError,
    MergeError,
    OutOfMemoryError,
    SplitRefusedError,
    TorchMemGuardError,
)
from torchmemguard.guarded import GuardState
from torchmemguard.merging import merge_padded
from torchmemguard.metrics import install_metrics, start_metrics_server
from torchmemguard.snapshots import SnapshotRecorder, record_oom_snapshots
from torchmemguard.training import accumulate_gradients

__all__ = [
    "BatchError",
    "Budget",
    "BudgetExceededError",
    "GuardState",
    "MergeError",
    "OutOfMemoryError",
    "SnapshotRecorder",
    "SplitRefusedError",
    "TorchMemGuardError",
    "accumulate_gradients",
    "current_budget",
    "guard",
    "install_metrics",
    "is_oom",
    "memory_budget",
    "merge_padded",
    "oom_safe",
    "record_oom_snapshots",
    "register_oom_matcher",
    "start_metrics_server",
    "unregister_oom_matcher",
]
__version__ = "0.1.0"
