"""Run a function on N new CPU processes joined in a gloo process group.

For tests and benchmarks of distributed code on one machine, without a
launcher: :func:`run_spawned` starts ``world_size`` processes that inherit no
state from the caller, joins them in a gloo process group through a file store
(no free port to find, so concurrent runs cannot collide), calls
``fn(rank, *args)`` on each and returns what each returned, in rank order::

    def worker(rank: int, scale: float) -> float:
        value = torch.tensor([scale * rank])
        dist.all_reduce(value)
        return value.item()

    run_spawned(worker, args=(2.0,), world_size=2, timeout_s=60)  # [2.0, 2.0]

Nothing blocks forever:

- a collective gives up after ``collective_timeout_s``, so a rank whose peer
  died raises instead of waiting;
- when a worker raises, the other workers are terminated and its traceback is
  raised in the caller (``torch.multiprocessing.ProcessRaisedException``);
- the whole run (process start-up included) is killed after ``timeout_s`` and
  raises :class:`TimeoutError`.

Start methods. ``"forkserver"`` (the default) forks the workers from a server
process that has imported torch once, so a run starts in a fraction of a
second instead of paying an interpreter and a torch import per worker
(seconds each). The server is started by the first forkserver run of the
calling process, with the environment variables of that moment, and lives as
long as the caller; this module sets its preload list. ``"spawn"`` starts
every worker as a fresh interpreter with the current environment: use it when
the environment changes between runs, or to measure a process's memory from
scratch. Either way torch's generators start from the same default seed in
every worker, so seed what they draw.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = [
    "DEFAULT_COLLECTIVE_TIMEOUT_S",
    "DEFAULT_NUM_THREADS",
    "START_METHODS",
    "run_spawned",
]

# A collective that waits longer than this raises (a peer died or diverged).
DEFAULT_COLLECTIVE_TIMEOUT_S = 60.0
# Torch threads per worker: several workers share a few cores, and more threads
# each would oversubscribe them.
DEFAULT_NUM_THREADS = 1
START_METHODS = ("forkserver", "spawn")
# Imported once by the fork server, so that workers start with torch loaded.
_FORKSERVER_PRELOAD = [__name__]
# Inside the run's private temp folder: the rendezvous file and each rank's result.
_STORE_FILENAME = "store"
_RESULT_FILENAME = "rank{rank}.pt"


def run_spawned(
    fn: Callable[..., Any],
    args: Sequence[Any] = (),
    *,
    world_size: int,
    timeout_s: float,
    collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S,
    process_group: bool = True,
    num_threads: int = DEFAULT_NUM_THREADS,
    start_method: str = "forkserver",
) -> list[Any]:
    """Call ``fn(rank, *args)`` on ``world_size`` spawned processes; their results by rank.

    Args:
        fn: A module-level function (the spawned processes import it by name).
            It runs with the default process group initialised (gloo, ranks
            ``0 .. world_size - 1``), which is destroyed after it returns.
        args: Passed to every rank after ``rank``; pickled, so tensors and
            modules are fine.
        world_size: Number of processes (>= 1).
        timeout_s: Deadline of the whole run, process start-up included; past
            it every worker is killed.
        collective_timeout_s: Timeout of the process group's collectives.
        process_group: False: no process group, e.g. to run a one-process
            reference in a fresh interpreter.
        num_threads: ``torch.set_num_threads`` in every worker.
        start_method: One of :data:`START_METHODS` (see the module docstring).

    Returns:
        What each rank's ``fn`` returned, in rank order; anything ``torch.save``
        can write (CPU tensors, numbers, containers, ...).

    Raises:
        ValueError: ``world_size``, ``timeout_s``, ``collective_timeout_s`` or
            ``num_threads`` is not positive, or an unknown ``start_method``.
        torch.multiprocessing.ProcessRaisedException: a worker raised; the
            message holds its traceback.
        torch.multiprocessing.ProcessExitedException: a worker exited with a
            non-zero code or was killed by a signal (``exit_code``,
            ``signal_name``).
        TimeoutError: the run passed ``timeout_s`` (a hang); the workers are
            killed before this is raised.
    """
    for name, value in (
        ("world_size", world_size),
        ("timeout_s", timeout_s),
        ("collective_timeout_s", collective_timeout_s),
        ("num_threads", num_threads),
    ):
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if start_method not in START_METHODS:
        raise ValueError(f"start_method must be one of {START_METHODS}, got {start_method!r}")
    if start_method == "forkserver":
        # Takes effect when the server starts; a running server keeps its list.
        multiprocessing.get_context("forkserver").set_forkserver_preload(_FORKSERVER_PRELOAD)
    with tempfile.TemporaryDirectory(prefix="moviegen-spawn-") as folder:
        context = mp.start_processes(
            _run_rank,
            args=(
                fn,
                tuple(args),
                world_size,
                folder,
                collective_timeout_s,
                process_group,
                num_threads,
            ),
            nprocs=world_size,
            join=False,
            start_method=start_method,
        )
        deadline = time.monotonic() + timeout_s
        try:
            # join() returns False while some worker runs, and raises (after
            # terminating the others) as soon as one fails.
            while not context.join(timeout=max(0.0, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"{world_size} spawned worker(s) of {getattr(fn, '__name__', fn)!r} did "
                        f"not finish within {timeout_s} s (a hang?); killed them"
                    )
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            for process in context.processes:
                process.join()
        return [_read_result(Path(folder), rank) for rank in range(world_size)]


def _run_rank(
    rank: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    world_size: int,
    folder: str,
    collective_timeout_s: float,
    process_group: bool,
    num_threads: int,
) -> None:
    """Body of one spawned worker: join the group, run ``fn``, leave, write the result."""
    torch.set_num_threads(num_threads)
    if process_group:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{os.path.join(folder, _STORE_FILENAME)}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=collective_timeout_s),
        )
    try:
        result = fn(rank, *args)
    finally:
        if process_group:
            dist.destroy_process_group()
    torch.save(result, Path(folder) / _RESULT_FILENAME.format(rank=rank))


def _read_result(folder: Path, rank: int) -> Any:
    path = folder / _RESULT_FILENAME.format(rank=rank)
    if not path.is_file():
        # e.g. a worker stopped by SIGINT, which torch's spawn wrapper treats as a clean exit.
        raise RuntimeError(f"spawned rank {rank} exited without a result")
    # Written a moment ago by our own worker into a private temp folder, so
    # trusted: unpickling allows any picklable result.
    return torch.load(path, weights_only=False)
