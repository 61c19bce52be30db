"""Worker processes that end with their parent: the renderer pools of rendering and synthesis.

    pool = spawn_pool(2, initializer=open_gl_context)   # a ProcessPoolExecutor

A pool shuts its workers down when its owner exits cleanly, but a SIGKILL of the owner (``occ render``
killed by a scheduler or an out-of-memory killer) gives it no chance: the workers would go on rendering
under PID 1. So each worker starts a daemon thread that waits for the parent *process* to end, on a
pidfd (Linux >= 5.3: woken at once) or else by polling ``getppid`` every POLL_S seconds, and then exits.

Not ``prctl(PR_SET_PDEATHSIG)``: it fires when the *thread* that spawned the worker ends (prctl(2)),
and a pool kept for the life of the process spawns its workers from whichever thread submits first, such
as a Prefect task thread that finishes long before the process does (tests/integration/
test_render_hardening.py::test_a_pool_started_from_a_thread_that_ended_keeps_working).
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

POLL_S = 0.5  # parent check interval where no pidfd can be had; also bounds how long an orphan lives


def spawn_pool(
    processes: int, initializer: Callable[..., None] | None = None, initargs: tuple[Any, ...] = ()
) -> ProcessPoolExecutor:
    """A pool of ``processes`` spawned workers (no GL state is forked) that exit when this process ends.

    Args:
        processes: Number of workers, at least 1.
        initializer: Run once in each worker after it starts watching its parent (e.g. open a context).
        initargs: Arguments of ``initializer``.
    Returns:
        The pool; its caller shuts it down as usual.
    """
    return ProcessPoolExecutor(
        processes,
        mp_context=get_context("spawn"),
        initializer=_init_worker,
        initargs=(os.getpid(), initializer, initargs),
    )


def _init_worker(parent_pid: int, initializer: Callable[..., None] | None, initargs: tuple[Any, ...]) -> None:
    exit_with_parent(parent_pid)
    if initializer is not None:
        initializer(*initargs)


def exit_with_parent(parent_pid: int) -> None:
    """End this process as soon as the process ``parent_pid`` ends (watched by a daemon thread)."""
    threading.Thread(target=_wait_for_parent, args=(parent_pid,), name="parent-watch", daemon=True).start()


def _wait_for_parent(parent_pid: int) -> None:
    try:
        pidfd: int | None = os.pidfd_open(parent_pid)
    except (AttributeError, OSError):  # not Linux >= 5.3, or the parent is already gone (ESRCH)
        pidfd = None
    # The check after opening closes the race with a parent that ended, and a pid reused, before it.
    if pidfd is not None and os.getppid() == parent_pid:
        select.select([pidfd], [], [])  # readable once the parent has exited
    else:
        while os.getppid() == parent_pid:
            time.sleep(POLL_S)
    os._exit(1)  # no clean-up: the parent that would collect results is gone
