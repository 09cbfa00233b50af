"""torchmemguard: keep PyTorch calls alive when a batch does not fit in memory."""

from torchmemguard.classify import is_oom, register_oom_matcher, unregister_oom_matcher
from torchmemguard.decorators import guard, oom_safe
from torchmemguard.errors import MergeError, OutOfMemoryError, TorchMemGuardError

__all__ = [
    "MergeError",
    "OutOfMemoryError",
    "TorchMemGuardError",
    "guard",
    "is_oom",
    "oom_safe",
    "register_oom_matcher",
    "unregister_oom_matcher",
]
__version__ = "0.1.0"
