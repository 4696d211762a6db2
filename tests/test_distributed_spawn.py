"""run_spawned: per-rank results, a worker's exception re-raised, a hang stopped by the deadline.

The workers do not inherit this process's imports (with either start method),
which also makes them the place to check that importing ``moviegen.distributed``
leaves the FSDP2 machinery unloaded.
"""

from __future__ import annotations

import multiprocessing
import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing import ProcessRaisedException

from moviegen.distributed.spawn import START_METHODS, run_spawned

pytestmark = pytest.mark.distributed

WORLD_SIZE = 2
# Deadline of the runs that should finish (start-up included, on 2 shared cores).
TIMEOUT_S = 120.0
# Deadline of the run that hangs, and how much longer than it the kill may take.
HANG_TIMEOUT_S = 2.0
KILL_SLACK_S = 10.0
OFFSET = 10.0
# Modules that a light import of moviegen.distributed must not load.
HEAVY_MODULES = ("moviegen.distributed.parallelize", "torch.distributed.fsdp")
FAILING_RANK = 1
FAILURE_MESSAGE = "rank 1 gave up on purpose"


def _report(rank: int, offset: float) -> dict:
    """This rank's view of the group, and what importing moviegen.distributed loaded."""
    value = torch.tensor([rank + offset])
    dist.all_reduce(value)
    import moviegen.distributed as package

    loaded_by_package = [name for name in HEAVY_MODULES if name in sys.modules]
    lazy_name_resolves = package.apply_fsdp.__module__ == "moviegen.distributed.parallelize"
    return {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "sum": value.item(),
        "threads": torch.get_num_threads(),
        "loaded_by_package": loaded_by_package,
        "lazy_name_resolves": lazy_name_resolves,
        "all": sorted(package.__all__),
    }


def _fail_on_one_rank(rank: int) -> None:
    if rank == FAILING_RANK:
        raise ValueError(FAILURE_MESSAGE)
    threading.Event().wait()  # the other rank would wait forever: it must be stopped


def _hang(rank: int) -> None:
    threading.Event().wait()


@pytest.fixture(scope="module", params=START_METHODS)
def reports(request) -> list[dict]:
    return run_spawned(
        _report,
        args=(OFFSET,),
        world_size=WORLD_SIZE,
        timeout_s=TIMEOUT_S,
        start_method=request.param,
    )


def test_results_come_back_per_rank(reports):
    assert [report["rank"] for report in reports] == list(range(WORLD_SIZE))
    expected_sum = sum(rank + OFFSET for rank in range(WORLD_SIZE))
    for report in reports:
        assert report["world_size"] == WORLD_SIZE
        assert report["sum"] == expected_sum  # the group really did a collective
        assert report["threads"] == 1


def test_package_import_leaves_fsdp_unloaded(reports):
    import moviegen.distributed as package
    from moviegen.distributed import mesh, parallelize

    for report in reports:
        assert report["loaded_by_package"] == []
        assert report["lazy_name_resolves"]
        assert report["all"] == sorted(package.__all__)
    assert sorted(package.__all__) == sorted([*mesh.__all__, *parallelize.__all__])
    for name in package.__all__:
        assert getattr(package, name) is getattr(
            mesh if name in mesh.__all__ else parallelize, name
        )


def test_worker_exception_is_reraised_with_its_message():
    # Also stops the other rank, which would wait forever (no TimeoutError).
    with pytest.raises(ProcessRaisedException, match=f"ValueError: {FAILURE_MESSAGE}"):
        run_spawned(_fail_on_one_rank, world_size=WORLD_SIZE, timeout_s=TIMEOUT_S)


def test_hang_hits_the_deadline():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish"):
        run_spawned(_hang, world_size=WORLD_SIZE, timeout_s=HANG_TIMEOUT_S)
    assert HANG_TIMEOUT_S <= time.monotonic() - start < HANG_TIMEOUT_S + KILL_SLACK_S
    assert multiprocessing.active_children() == []  # killed and reaped


@pytest.mark.parametrize(
    "bad",
    [{"world_size": 0}, {"timeout_s": 0}, {"num_threads": -1}, {"start_method": "fork"}],
)
def test_bad_arguments_are_value_errors(bad):
    kwargs = {"world_size": WORLD_SIZE, "timeout_s": TIMEOUT_S, **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        run_spawned(_hang, **kwargs)
