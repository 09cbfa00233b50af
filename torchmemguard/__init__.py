"""torchmemguard: keep PyTorch calls alive when a batch does not fit in memory.

Every public name is here; the modules behind them are private and may move.
"""

from torchmemguard._budget import Budget, current_budget, memory_budget
from torchmemguard._classify import is_oom, register_oom_matcher, unregister_oom_matcher
from torchmemguard._decorators import guard, oom_safe
from torchmemguard._errors import (
    BatchError,
    BatchTypeError,
    BudgetExceededError,
    MergeError,
    OutOfMemoryError,
    QueueFullError,
    SplitRefusedError,
    TorchMemGuardError,
)
from torchmemguard._events import GuardStats
from torchmemguard._fitting import ShapeKey
from torchmemguard._guarded import GuardState
from torchmemguard._merging import Merger, merge_padded
from torchmemguard._observability.metrics import install_metrics, start_metrics_server
from torchmemguard._observability.snapshots import SnapshotRecorder, record_oom_snapshots
from torchmemguard._options import GuardOptions, Options
from torchmemguard._serving.batcher import Batcher
from torchmemguard._training.accumulate import accumulate_gradients
from torchmemguard._training.step import AccumulatingStep

__all__ = [
    "AccumulatingStep",
    "BatchError",
    "BatchTypeError",
    "Batcher",
    "Budget",
    "BudgetExceededError",
    "GuardOptions",
    "GuardState",
    "GuardStats",
    "MergeError",
    "Merger",
    "Options",
    "OutOfMemoryError",
    "QueueFullError",
    "ShapeKey",
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

# The names belong to the package, wherever they are defined: reprs, pickles and
# documentation name them as users import them.
for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
