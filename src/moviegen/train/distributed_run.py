"""Running a trainer as one of the processes of a ``torchrun`` job.

``torchrun`` (or ``srun`` + ``torchrun`` on SLURM, see ``scripts/slurm_train.sbatch``)
starts one process per accelerator and tells each who it is through the
environment: ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` (plus the rendezvous
address, which ``init_process_group`` reads itself). :func:`distributed_run`
reads them when it is entered (never at import):

- ``WORLD_SIZE`` absent or 1: nothing happens, the trainers run as a single
  process exactly as without torchrun (their single-process checkpoints and all);
- ``WORLD_SIZE > 1``: on CUDA machines ``torch.cuda.set_device(LOCAL_RANK)``
  first, then the default process group (NCCL for CUDA tensors, gloo for CPU
  tensors, which DCP and small object collectives use), destroyed again when
  the block exits, also on errors.

The helpers below are what the trainers need from the group: which rank is
rank 0 (the one that prints, logs and writes files), sums over the
data-parallel ranks, gradient averaging for the TAE (which is small enough to
replicate) and one decision that every rank takes alike.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

__all__ = [
    "COLLECTIVE_TIMEOUT_S",
    "RunEnv",
    "all_gather_sizes",
    "all_reduce_sum",
    "any_rank",
    "average_gradients",
    "barrier",
    "distributed_run",
    "max_over_ranks",
    "run_env",
    "torchrun_env",
]

# torchrun's variables: this process's global rank, its rank on its node, the job size.
RANK_ENV = "RANK"
LOCAL_RANK_ENV = "LOCAL_RANK"
WORLD_SIZE_ENV = "WORLD_SIZE"
# A collective that waits longer than this fails instead of hanging forever (a
# peer died or the ranks diverged). Generous: a checkpoint save or the first
# torch.compile of a block can keep some ranks busy for minutes.
COLLECTIVE_TIMEOUT_S = 30 * 60


@dataclass(frozen=True, kw_only=True)
class RunEnv:
    """Who this process is in the job (a single process is rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints, logs and writes run files."""
        return self.rank == 0


def torchrun_env(environ: Mapping[str, str] | None = None) -> RunEnv:
    """The rank, local rank and world size that torchrun put in the environment.

    Raises:
        ValueError: a variable that is not an integer, or ranks out of range.
    """
    environ = os.environ if environ is None else environ
    values = {}
    for name, default in ((RANK_ENV, 0), (LOCAL_RANK_ENV, 0), (WORLD_SIZE_ENV, 1)):
        text = environ.get(name)
        try:
            values[name] = default if text is None else int(text)
        except ValueError:
            raise ValueError(f"environment variable {name}={text!r} is not an integer") from None
    env = RunEnv(
        rank=values[RANK_ENV], local_rank=values[LOCAL_RANK_ENV], world_size=values[WORLD_SIZE_ENV]
    )
    if env.world_size < 1 or not 0 <= env.rank < env.world_size or env.local_rank < 0:
        raise ValueError(
            f"inconsistent torchrun environment: {RANK_ENV}={env.rank}, "
            f"{LOCAL_RANK_ENV}={env.local_rank}, {WORLD_SIZE_ENV}={env.world_size}"
        )
    return env


def run_env() -> RunEnv:
    """This process's place in the job: from the process group when there is one.

    Raises:
        RuntimeError: torchrun started several processes but no process group
            was initialised (wrap the training in :func:`distributed_run`).
    """
    if dist.is_available() and dist.is_initialized():
        local_rank = torchrun_env().local_rank
        return RunEnv(rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size())
    env = torchrun_env()
    if env.is_distributed:
        raise RuntimeError(
            f"{WORLD_SIZE_ENV}={env.world_size} but torch.distributed is not initialised; run "
            "the trainer inside `with moviegen.train.distributed_run.distributed_run():` "
            "(the `moviegen train` / `moviegen tae train` verbs do)"
        )
    return env


@contextmanager
def distributed_run() -> Iterator[RunEnv]:
    """Initialise the default process group for a torchrun job of several processes.

    Yields this process's :class:`RunEnv`. A single process (no torchrun, or
    ``--nproc_per_node 1`` on one node) gets no process group. A group that
    exists already (initialised by the caller) is used and left alone.
    """
    env = torchrun_env()
    owns_group = False
    if env.is_distributed and not dist.is_initialized():
        if torch.cuda.is_available():
            # Before any CUDA work and before NCCL: each rank on its own GPU.
            torch.cuda.set_device(env.local_rank)
        # No backend named: gloo for CPU tensors, plus NCCL for CUDA tensors when
        # CUDA is available (DCP's and the object collectives' CPU traffic uses gloo).
        dist.init_process_group(timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        owns_group = True
    yield run_env()
    # Only after success: a rank that raised skips this (a barrier or a teardown
    # could wait on peers stuck in a collective; torchrun stops them). Otherwise
    # every rank waits here until all have finished their work, so none tears
    # down its connections while another still writes a checkpoint; objects that
    # hold the groups (device meshes of sharded modules, in reference cycles)
    # are collected while the interpreter is fully alive, not at its exit, where
    # freeing a gloo group's pending work can abort the process ("terminate
    # called without an active exception", seen once in CI).
    if owns_group and dist.is_initialized():
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- collectives


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    if _distributed():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` over all ranks, in place (unchanged in one process)."""
    if _distributed():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_gather_sizes(size: int, device: torch.device) -> list[int]:
    """Every rank's ``size`` (e.g. its batch size), in rank order; ``[size]`` in one process."""
    if not _distributed():
        return [size]
    mine = torch.tensor([size], dtype=torch.int64, device=device)
    gathered = torch.empty(dist.get_world_size(), dtype=torch.int64, device=device)
    dist.all_gather_single(gathered, mine)
    return [int(value) for value in gathered.tolist()]


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank: decisions that must agree
    (e.g. a time budget measured by each rank's own clock)."""
    if not _distributed():
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def max_over_ranks(value: float, device: torch.device) -> float:
    """The largest ``value`` over all ranks (``value`` in one process)."""
    if not _distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


@torch.no_grad()
def average_gradients(parameters: Iterable[torch.Tensor]) -> None:
    """Average the gradients of replicated parameters over all ranks (what DDP does).

    One all-reduce of all gradients flattened into one buffer, after backward
    (no overlap with it: fine for modules as small as the TAE). Parameters
    without a gradient are skipped; every rank must have the same ones.
    """
    if not _distributed():
        return
    grads = [param.grad for param in parameters if param.grad is not None]
    if not grads:
        return
    world_size = dist.get_world_size()
    # One buffer per dtype/device: the flat buffer needs one of each.
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for grad in grads:
        groups.setdefault((grad.dtype, grad.device), []).append(grad)
    for group in groups.values():
        flat = _flatten_dense_tensors(group)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world_size)
        for grad, synced in zip(group, _unflatten_dense_tensors(flat, group), strict=True):
            grad.copy_(synced)
