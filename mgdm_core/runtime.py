"""Process-wide settings mgdm applies to its own processes: CPU threads and glibc's allocator.

`configure_process()` runs at the start of every stage (`launch.run_stage`, torchrun workers) and
in `benchmarks/bench_core.py`. It is idempotent and changes no result:

- threads: torch's intra-op pool gets the cores this process may run on (`os.sched_getaffinity`,
  divided among the local torchrun processes), not the machine's count, unless `OMP_NUM_THREADS`
  says otherwise; one pool per process, so two pools never spin on the same cores.
- allocator (glibc only): by default glibc serves blocks above a dynamic threshold with fresh
  `mmap`s and returns the heap's top above `M_TRIM_THRESHOLD` to the kernel, so every training or
  sampling step faults its activations in again, page by page. `mallopt` raises the mmap threshold
  to glibc's maximum (32 MiB on 64-bit: every activation of the reference networks fits) and keeps
  up to 1 GiB of freed heap, so steps reuse memory that is already mapped. The same settings are
  exported as `MALLOC_*_` to the processes mgdm starts (DVC stages, torchrun, evaluation workers),
  which apply them when they start; values the user set are kept.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

import torch

log = logging.getLogger("mgdm")

# mallopt parameter numbers (glibc malloc.h) and the values mgdm uses.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
MALLOC_SETTINGS: dict[str, tuple[int, int]] = {
    # env name: (mallopt parameter, value in bytes)
    "MALLOC_MMAP_THRESHOLD_": (_M_MMAP_THRESHOLD, 32 * 2**20),  # glibc's upper limit on 64-bit
    "MALLOC_TRIM_THRESHOLD_": (_M_TRIM_THRESHOLD, 2**30),
    "MALLOC_TOP_PAD_": (_M_TOP_PAD, 64 * 2**20),
}

_configured = False


def cpu_threads() -> int:
    """Intra-op threads for this process: OMP_NUM_THREADS when set, else its usable cores per local process."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // max(1, local_processes))


def tune_malloc() -> bool:
    """Apply MALLOC_SETTINGS to this process with glibc's mallopt; False where there is no glibc.

    A value the user exported (`MALLOC_MMAP_THRESHOLD_=...`) was already applied by glibc at start
    and is left alone.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries: nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = True
    for name, (parameter, value) in MALLOC_SETTINGS.items():
        if name not in os.environ:
            ok = mallopt(parameter, value) == 1 and ok
    return ok


def export_malloc_settings(env: dict[str, str] | None = None) -> dict[str, str]:
    """MALLOC_*_ defaults in `env` (os.environ by default) for the processes started from here."""
    target = os.environ if env is None else env
    for name, (_, value) in MALLOC_SETTINGS.items():
        target.setdefault(name, str(value))
    return dict(target)


def configure_process(threads: int | None = None, *, malloc: bool = True) -> None:
    """Threads (`threads`, else `cpu_threads()`) and, unless `malloc` is False (for A/B measurements),
    allocator settings for this process; once per process unless `threads` is given."""
    global _configured
    if _configured and threads is None:
        return
    torch.set_num_threads(threads or cpu_threads())
    if not _configured and malloc:
        tuned = tune_malloc()
        export_malloc_settings()
        log.debug("runtime: %d threads, glibc malloc tuned: %s", torch.get_num_threads(), tuned)
    _configured = True
