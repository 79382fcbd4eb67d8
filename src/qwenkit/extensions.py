"""Building qwenkit's C++ kernels (quant/cpu_kernels.cpp, data/minhash_kernel.cpp) on first use.

torch.utils.cpp_extension compiles them once into its cache directory under a lock file, and a process
that finds the lock waits until it disappears. A build killed half-way (kill -9, a closed terminal)
leaves the lock behind, and every later run would then wait forever; `build_extension` removes a lock
older than STALE_LOCK_SECONDS first (a real build takes well under a minute here).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

STALE_LOCK_SECONDS = 600


def stale_lock(name: str) -> Path | None:
    """The lock file of extension `name`'s build directory when it is older than STALE_LOCK_SECONDS."""
    from torch.utils import cpp_extension

    try:
        lock = Path(cpp_extension._get_build_directory(name, verbose=False)) / "lock"
        age = time.time() - lock.stat().st_mtime
    except (AttributeError, OSError):  # no lock (or a torch without this helper)
        return None
    return lock if age > STALE_LOCK_SECONDS else None


def build_extension(name: str, **options):
    """cpp_extension.load(name=name, **options), after removing a stale build lock."""
    from torch.utils import cpp_extension

    lock = stale_lock(name)
    if lock is not None:
        warnings.warn(f"removing {lock}: left by a build of {name} that was interrupted", stacklevel=2)
        lock.unlink(missing_ok=True)
    return cpp_extension.load(name=name, verbose=False, **options)
