"""Data-parallel training with PyTorch's own engine: DDP under torchrun.

    torchrun --nproc-per-node 2 -m alexnet train --data DIR ...                 # one machine
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
             --rdzv-endpoint HOST:29500 -m alexnet train --data DIR ...         # several machines

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK for each process; without them training runs in one
process. --batch-size stays the global batch: each rank takes a contiguous share of every batch, so
the steps, the schedule and a resume are the same for any number of processes. Only rank 0 writes the
run directory and prints; the others read its statistics and checkpoints there, so machines must share
it (checked), and each reads --data itself. After torchrun restarts failed workers (--max-restarts), the
run continues from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import UserError, one_line


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    distributed: bool = False  # in a torchrun process group (of any size)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """torchrun sets RANK and WORLD_SIZE, also for one process (which then runs DDP over one GPU)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def restarted_by_torchrun() -> bool:
    """True in the workers torchrun starts again after a failure (--max-restarts)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def start(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join the process group torchrun set up (NCCL for CUDA, gloo for the CPU); one GPU per process."""
    if not launched_by_torchrun():
        return Ranks(), device
    env = os.environ
    ranks = Ranks(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")), distributed=True)
    if device.type == "cuda":
        if ranks.local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {ranks.local_rank} has no GPU: {torch.cuda.device_count()} visible")
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            store=_attempt_store(ranks),
            rank=ranks.rank,
            world_size=ranks.world_size,
            timeout=TIMEOUT,
            device_id=device if backend == "nccl" else None,
        )
    return ranks, device


# Long: rank 0 alone computes the dataset statistics while the others wait at a barrier.
TIMEOUT = datetime.timedelta(hours=6)


def _attempt_store(ranks: Ranks) -> dist.Store:
    """The store at MASTER_ADDR:MASTER_PORT, its keys scoped to this attempt of the job.

    torchrun's agent keeps one store for all its restarts. Without a scope, a restarted rank may read
    the address that a dead process of the previous attempt published, and fail to connect to it.
    """
    env = os.environ
    agent_hosts_it = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        env["MASTER_ADDR"],
        int(env["MASTER_PORT"]),
        ranks.world_size,
        is_master=ranks.is_main and not agent_hosts_it,
        timeout=TIMEOUT,
    )
    return dist.PrefixStore(f"alexnet/attempt-{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()


def sum_over_ranks(tensor: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """In place: the sum of `tensor` over all ranks (no-op in one process)."""
    if ranks.distributed:
        dist.all_reduce(tensor)
    return tensor


@contextlib.contextmanager
def together(ranks: Ranks) -> Iterator[None]:
    """Runs a block that may stop on some ranks only (a folder missing on one machine, a full disk on
    rank 0): then every rank stops, the others with a line that names the rank and its error, where
    they would otherwise fail in their next collective operation with a traceback, or wait in it."""
    failure: UserError | OSError | None = None
    try:
        yield
    except (UserError, OSError) as e:
        if not ranks.distributed:
            raise
        failure = e
    if ranks.distributed:
        failures: list[str | None] = [None] * ranks.world_size
        dist.all_gather_object(failures, None if failure is None else one_line(failure))
        if failure is not None:
            raise failure
        for rank, message in enumerate(failures):
            if message is not None:
                raise UserError(f"rank {rank} stopped: {message}")


def differing_ranks(value: object, ranks: Ranks) -> str:
    """Which ranks hold a `value` other than rank 0's ('rank 3', 'ranks 1, 2'), '' where none does.

    Every rank gets the same answer, so all of them can stop together on it.
    """
    if not ranks.distributed:
        return ""
    values: list[object] = [None] * ranks.world_size
    dist.all_gather_object(values, value)
    odd = [str(r) for r, v in enumerate(values) if v != values[0]]
    return f"rank{'s' if len(odd) > 1 else ''} {', '.join(odd[:8])}{', ...' if len(odd) > 8 else ''}" if odd else ""


def main_process() -> bool:
    """Rank 0 of a torchrun job, or a process torchrun did not start (what prints the final lines)."""
    return os.environ.get("RANK", "0") == "0"


def union_over_ranks(items: set[str], ranks: Ranks) -> set[str]:
    """The union of every rank's `items` (the bad files each one met), on every rank."""
    if not ranks.distributed:
        return items
    gathered: list[set[str] | None] = [None] * ranks.world_size
    dist.all_gather_object(gathered, items)
    return set().union(*gathered)
