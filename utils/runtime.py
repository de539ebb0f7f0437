"""How the course's torch code runs: one thread, and freed memory handed back after every notebook cell.

Every module of the learner's API that uses torch imports this first (`from utils import runtime`), so a
notebook gets these settings whatever it imports; the tooling (utils/tooling) does not, and starts fast.
"""


import ctypes
import os

import torch

# The course's models are tiny. One thread trains them as fast as two on an idle laptop and
# stays fast when anything else is busy: measured here, two OpenMP threads sharing 2 cores with
# one other busy process ran 25x slower. Set CIRCUITS_TORCH_THREADS to override.
torch.set_num_threads(int(os.environ.get("CIRCUITS_TORCH_THREADS", "1")))


# glibc keeps the blocks a computation frees (activations of a few MB each) in the process's
# heap for reuse instead of returning them to the OS: measured, a chapter's kernel held 90-240
# MB of freed memory after Run All, on top of some 530 MB of imports, models and results.
# JupyterLab keeps every opened chapter's kernel alive, and Binder has 2 GB. One malloc_trim
# after each cell gives it back (it takes milliseconds at most).
def _find_malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (macOS, musl, Windows)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_malloc_trim = _find_malloc_trim()


def release_freed_memory(*_) -> bool:
    """Give the memory this process has freed back to the OS (glibc's malloc_trim); True if it could.

    Without glibc it does nothing: other C libraries return large freed blocks on their own.
    Importing ``utils`` in a notebook calls it after every cell.
    """
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True


def release_memory_after_every_cell(shell) -> None:
    """Make an IPython `shell` call release_freed_memory after each cell it runs (once, however often called)."""
    if _malloc_trim is None:
        return
    callbacks = shell.events.callbacks["post_run_cell"]
    if not any(getattr(cb, "__qualname__", None) == release_freed_memory.__qualname__ for cb in callbacks):
        shell.events.register("post_run_cell", release_freed_memory)


def _running_shell():
    try:
        from IPython import get_ipython
    except ImportError:  # no IPython, no notebook
        return None
    return get_ipython()


if _running_shell() is not None:
    release_memory_after_every_cell(_running_shell())
