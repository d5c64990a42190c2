"""Data-parallel runs: the same command on N processes, ``torchrun --nproc-per-node N -m castlens ...``.

Every long castlens run is a list of independent **units** (a task of ``vectors`` or ``analyze``, a target of
``transfer``, ``selection-study`` or ``compose``), and each finished unit is already kept as a file (a *part*)
so that a killed run resumes. Data parallelism needs nothing more than that::

    rank r of N computes its share of the unfinished units   (balanced by size, the same split on every rank)
    and writes each part atomically                          (castlens.files: no reader sees half a file)
    barrier                                                  (every part is on disk)
    rank 0 reads all parts and writes the tables             (the code a single process runs)

No tensor crosses a process boundary: ranks meet only at barriers, and the file system carries the parts. So the
merged files are those of a single-process run (each unit is computed by the same code on the same inputs; bit
for bit at the same thread count: torchrun gives each rank one CPU thread, and a matmul's sum order, hence its last
bit and a dev sweep's near-ties, depends on the thread count), a
rank that is killed loses only its unfinished unit (rerun the same launch: finished parts are kept, the rest
re-split), and a rank that fails fails the launch: torchrun stops the other ranks and reports that rank's
error (the CLI records it with torch's ``@record``). The backend is gloo on CPU and nccl on GPU, where each
rank takes the GPU of its ``LOCAL_RANK``.

Outside torchrun (no ``WORLD_SIZE`` in the environment) :func:`world` is one process, and every function here
is a no-op. Knows no model.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, TextIO, TypeVar, cast

__all__ = ["World", "world", "share", "shows_progress", "BARRIER_TIMEOUT"]

T = TypeVar("T")

#: How long a rank waits at a barrier for the slowest rank's unit (a real-model unit can take an hour).
BARRIER_TIMEOUT = datetime.timedelta(hours=24)


@dataclass(frozen=True)
class World:
    """This process's place in the launch: ``rank`` of ``size`` (``local_rank`` on its node)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process writes the merged results (rank 0)."""
        return self.rank == 0

    @property
    def device(self) -> str | None:
        """The device this rank's model goes on by default: its own GPU under a multi-process launch with CUDA,
        else ``None`` (castlens' usual default)."""
        import torch

        return f"cuda:{self.local_rank}" if self.size > 1 and torch.cuda.is_available() else None

    def barrier(self) -> None:
        """Wait for every rank (nothing with one process)."""
        if self.size > 1:
            import torch
            import torch.distributed as dist

            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[torch.cuda.current_device()])
            else:
                dist.barrier()

    def close(self) -> None:
        """End the process group at the end of a multi-process launch (nothing with one process)."""
        if self.size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            _WORLD.clear()

    def mine(self, units: Sequence[str], sizes: Mapping[str, float] | None = None) -> list[str]:
        """This rank's share of ``units`` (see :func:`share`), in their given order."""
        return share(units, self.size, sizes)[self.rank]

    def once(self, compute: Callable[[], T]) -> T:
        """``compute()`` on rank 0 first, then on the others: for work that keeps its result in a file and reads it
        back when called again (the candidate pool, shared source vectors), so it is done once, not N times."""
        if self.main:
            out = compute()
            self.barrier()
            return out
        self.barrier()
        return compute()

    def labelled(self, stream: TextIO) -> TextIO:
        """``stream`` with each line prefixed by ``[rank r]`` in a multi-process launch (``stream`` itself else)."""
        return stream if self.size == 1 else cast(TextIO, _Prefixed(stream, f"[rank {self.rank}] "))


def share(units: Sequence[str], n: int, sizes: Mapping[str, float] | None = None) -> list[list[str]]:
    """Split ``units`` over ``n`` ranks: the largest unit first to the least loaded rank (the longest-processing-
    time rule; ``sizes`` default to 1 each, ties to the lower rank), so the split is the same on every rank and
    the slowest rank has as little as the rule can give it. Each share keeps the units' given order."""
    load, owner = [0.0] * n, {}
    for u in sorted(units, key=lambda u: -(sizes or {}).get(u, 1.0)):  # a stable sort: equal sizes keep order
        r = min(range(n), key=lambda r: (load[r], r))
        owner[u], load[r] = r, load[r] + (sizes or {}).get(u, 1.0)
    return [[u for u in units if owner[u] == r] for r in range(n)]


_WORLD: list[World] = []


def world() -> World:
    """The launch this process belongs to. Under torchrun (``WORLD_SIZE`` > 1 in the environment) the process
    group is initialised on the first call (gloo on CPU, nccl with CUDA); otherwise a world of one."""
    if _WORLD:
        return _WORLD[0]
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=BARRIER_TIMEOUT)
    _WORLD.append(World(dist.get_rank(), dist.get_world_size(), local))
    return _WORLD[0]


class _Prefixed:
    """A text stream that starts every line with ``prefix`` (so interleaved ranks' logs stay readable)."""

    def __init__(self, stream: TextIO, prefix: str):
        self._stream, self._prefix, self._at_start = stream, prefix, True

    def write(self, text: str) -> int:
        out = []
        for line in text.splitlines(keepends=True):
            out.append((self._prefix if self._at_start else "") + line)
            self._at_start = line.endswith("\n")
        self._stream.write("".join(out))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def shows_progress(progress: bool | None, n_batches: int) -> bool:
    """Whether a loop over ``n_batches`` shows a progress bar: as asked, else when it is long (over 4 batches);
    never on a rank other than 0 of a torchrun launch (``RANK`` in the environment), so bars come from one rank."""
    return (progress if progress is not None else n_batches > 4) and os.environ.get("RANK", "0") == "0"
