"""Work shared over the ranks of a torch.distributed process group (torchrun; gloo on CPUs, NCCL on GPUs).

fit_alpha and llm.distill come here only when a process group is in use.  torch is imported
inside the functions, never at module import, so ``import markovmem`` does not import torch
and a one-process run never touches torch.distributed.  The module sits beside the Python API
rather than in markovmem.llm because fit_alpha, which needs no torch otherwise, uses it too;
torch is only the transport (Python objects gathered between ranks), never part of the numerics.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ._errors import DistributedError

__all__ = ["Ranks", "block", "checked", "exchange", "local_device", "resolve"]

T = TypeVar("T")

#: Environment variable: seconds a collective of a process group that markovmem creates may
#: wait for the other ranks (default: torch's 30 minutes).  A group the caller created keeps
#: its own timeout.
TIMEOUT_ENV = "MARKOVMEM_DIST_TIMEOUT"
_ENV_NEEDED = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Ranks:
    """The process group a call runs on: ``group`` (None for the default group), this ``rank``
    and the ``world`` size (both within the group)."""

    group: Any
    rank: int
    world: int


def resolve(dist: bool | None, group: Any) -> Ranks | None:
    """The group to run on, or None for a one-process run.

    ``dist=None`` uses an initialised default group if there is one (a caller under torchrun
    that set up torch.distributed) and runs in one process otherwise; ``dist=True`` also
    initialises the default group from the environment torchrun sets when none exists;
    ``dist=False`` runs in this process alone.  ``group`` (a torch.distributed ProcessGroup)
    selects a group other than the default one.
    """
    if dist is False:
        if group is not None:
            raise ValueError("group is given with dist=False; pass dist=None or True to run on the group")
        return None
    if dist is not None and not isinstance(dist, bool):
        raise TypeError(f"dist must be None, True or False; got {dist!r}")
    loaded = sys.modules.get("torch.distributed")
    if dist is None and group is None and (loaded is None or not loaded.is_available() or not loaded.is_initialized()):
        return None
    import torch.distributed as td

    if not td.is_available():
        raise RuntimeError("torch.distributed is not available in this build of torch")
    if not td.is_initialized():
        if group is not None:
            raise ValueError("group is given but torch.distributed is not initialised")
        _init_from_env(td)
    return Ranks(group, td.get_rank(group), td.get_world_size(group))


def _init_from_env(td: Any) -> None:
    """Initialise the default group from torchrun's environment (gloo on CPU; NCCL for CUDA tensors)."""
    import datetime

    import torch

    missing = [name for name in _ENV_NEEDED if name not in os.environ]
    if missing:
        raise ValueError(
            f"dist=True needs the environment torchrun sets ({', '.join(_ENV_NEEDED)}); {', '.join(missing)} "
            "missing: start the program with torchrun, or call torch.distributed.init_process_group first"
        )
    seconds = float(os.environ.get(TIMEOUT_ENV, "1800"))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    td.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=seconds))


def local_device() -> Any:
    """This rank's device: ``cuda:LOCAL_RANK`` when CUDA is available, else None (the caller's choice)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def block(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous block [a, b) of ``n`` items that ``rank`` of ``world`` takes (sizes differ by at most 1)."""
    base, extra = divmod(n, world)
    a = rank * base + min(rank, extra)
    return a, a + base + (rank < extra)


def checked(ranks: Ranks | None, work: Callable[[], T]) -> T:
    """``work()`` on this rank, its result kept here; as :func:`exchange` for errors (every rank
    raises when one fails), with only the ranks' success sent between them."""
    if ranks is None:
        return work()
    box: list[T] = []
    exchange(ranks, lambda: box.append(work()))
    return box[0]


def exchange(ranks: Ranks | None, work: Callable[[], T]) -> list[T]:
    """Run ``work()`` on this rank and gather every rank's result, in rank order, on every rank.

    One collective per call (bounded by the group's timeout), which also carries each
    rank's failure: when ``work`` raises on any rank, every rank raises DistributedError
    naming that rank and its message, instead of the others waiting for it.  A rank that
    died or did not answer in time makes the collective fail, and that too becomes a
    DistributedError.  Without ``ranks`` (one process) this is ``[work()]``.
    """
    if ranks is None:
        return [work()]
    import torch.distributed as td

    error: BaseException | None = None
    try:
        mine: tuple[bool, Any] = (True, work())
    except Exception as exc:  # noqa: BLE001 - any failure is sent to the other ranks and raised below on every rank
        error = exc
        mine = (False, f"{type(exc).__name__}: {exc}")
    got: list[Any] = [None] * ranks.world
    try:
        td.all_gather_object(got, mine, group=ranks.group)
    except Exception as exc:  # noqa: BLE001 - any collective failure means a peer is gone: say so, with the cause
        raise DistributedError(
            f"rank {ranks.rank} of {ranks.world}: a collective with the other ranks failed (a rank exited, or did "
            f"not answer within the process group's timeout): {exc}"
        ) from (error or exc)
    failed = [(r, msg) for r, (ok, msg) in enumerate(got) if not ok]
    if failed:
        r, msg = failed[0]
        more = f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
        raise DistributedError(f"rank {r} of {ranks.world} failed{more}: {msg}") from error
    return [payload for _, payload in got]
