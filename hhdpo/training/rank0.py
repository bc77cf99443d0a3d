"""Rank-0-only work whose outcome every rank shares: one failure ends every rank, nobody hangs.

Rank 0 alone writes the run's files (config, run state, metrics and W&B, margins, the final
export, a checkpoint's last files). A rank-0 failure used to leave the other ranks waiting in
their next collective until the process group's timeout (10 minutes on NCCL, 30 on gloo), or
for ever under ``srun``. Each such section here ends in an exchange of outcomes over a gloo
group with a long timeout (:data:`WAIT_S`: a Hub download may take long, and the others must
not time out while they wait for it), so that

- every rank raises when any rank failed, with the first failed rank's message: a
  :class:`~hhdpo.core.errors.BadInput` stays one (exit 2, said once by rank 0), anything
  else ends every rank as unexpected (exit 1): the failed rank with its own traceback, the
  others with :class:`RankFailed` ("rank 0 failed while <what>: <its error>");
- :func:`on_rank0` hands rank 0's result to every rank.

Every rank must enter the same sections in the same order (they are collectives).
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Callable, Iterator, TypeVar

import torch.distributed as dist

from hhdpo.core.errors import BadInput

T = TypeVar("T")
WAIT_S = 4 * 3600  # the long wait: a model download before loading, a slow shared file system
_group = None


class RankFailed(RuntimeError):
    """Another rank failed in a shared section; its message says which, where and why (exit 1)."""


class RankBadInput(BadInput):
    """Another rank found bad input in a shared section (exit 2; rank 0 says it)."""


def setup(wait_s: float = WAIT_S) -> None:
    """On every rank, once the process group is up: the gloo group the outcomes travel over."""
    global _group
    _group = None
    if dist.get_world_size() > 1:
        _group = dist.new_group(backend="gloo", timeout=timedelta(seconds=wait_s))


def _describe(e: BaseException) -> tuple[bool, str]:
    from hhdpo.core.config import redact

    return isinstance(e, BadInput), redact(str(e) if isinstance(e, BadInput) else f"{type(e).__name__}: {e}")


def exchange(what: str, err: BaseException | None, result=None):
    """Share this rank's outcome (``err`` or ``result``) with every rank; collective.

    Raises ``err`` on its own rank and a :class:`RankFailed` / :class:`RankBadInput` on every
    other when any rank failed; else returns rank 0's ``result``.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if err is not None:
            raise err
        return result
    rank = dist.get_rank()
    mine = (rank, *_describe(err)) if err is not None else None
    outcomes: list = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, (mine, result if rank == 0 else None), group=_group)
    if err is not None:
        raise err
    failed = [o[0] for o in outcomes if o[0] is not None]
    if failed:
        who, bad, msg = failed[0]
        if bad:
            raise RankBadInput(msg)
        raise RankFailed(f"rank {who} failed while {what}: {msg}")
    return outcomes[0][1]


@contextlib.contextmanager
def shared(what: str) -> Iterator[None]:
    """Every rank runs the block (rank 0's part inside it writing); any rank's failure ends all."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - shared, then raised again on this rank
        exchange(what, e)
    else:
        exchange(what, None)


def on_rank0(what: str, fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 only; its (picklable) result on every rank, or its failure raised on every rank."""
    result, err = None, None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - shared below
            err = e
    return exchange(what, err, result)


def on_node_leaders(what: str, fn: Callable[[], None]) -> None:
    """``fn()`` on local rank 0 of every node (a download into the node's cache) while the other
    ranks wait (up to :data:`WAIT_S`), then every rank raises if any of them failed."""
    err = None
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - shared below
            err = e
    exchange(what, err)
