"""Several processes under torchrun: who this process is, and what it shares with the others.

``torchrun --nproc_per_node N -m kdcache ...`` starts N copies of the command
and tells each its place through the environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``). :class:`Dist` holds that place; :func:`init` joins
torch.distributed's process group (NCCL when the model runs on CUDA, gloo on a
CPU) only when there is more than one process, so a plain ``kdcache ...`` run
never touches torch.distributed and behaves exactly as before.

What is split how, and why:

* the dump: image rows ``row % W == rank`` (all K views of an image in one
  rank, so each image is still decoded once); see :mod:`kdcache.parts`;
* training: :class:`~kdcache.loaders.EpochOrder` with ``rank`` and
  ``world_size``: every rank draws the same ``(seed, epoch)`` permutation and
  takes every W-th entry, so the union of the ranks' step ``s`` batches is the
  one-process step ``s`` batch.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping

import numpy as np
import torch
import torch.distributed as tdist

from .errors import KdcacheError


@dataclass(frozen=True)
class Dist:
    """This process's place among the processes of one job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Dist:
        """The place torchrun gave this process; rank 0 of 1 without torchrun."""
        env = os.environ if env is None else env
        try:
            d = cls(rank=int(env.get("RANK", 0)), world_size=int(env.get("WORLD_SIZE", 1)),
                    local_rank=int(env.get("LOCAL_RANK", 0)))
        except ValueError:
            raise KdcacheError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them)") from None
        if not 0 <= d.rank < d.world_size:
            raise KdcacheError(f"RANK {d.rank} is outside WORLD_SIZE {d.world_size}")
        return d

    @property
    def enabled(self) -> bool:
        """True when several processes share the work."""
        return self.world_size > 1

    def is_main(self) -> bool:
        """Rank 0 writes the shared outputs and is the only one that reports."""
        return self.rank == 0

    def place(self, device: torch.device) -> torch.device:
        """The device of this process: ``cuda:LOCAL_RANK`` for CUDA under torchrun, else `device`."""
        if device.type != "cuda" or not self.enabled:
            return device
        if device.index is not None:
            raise KdcacheError(f"--device {device} names one GPU, but {self.world_size} processes run: use "
                               "--device cuda (or auto) and each process takes the GPU of its LOCAL_RANK")
        if self.local_rank >= torch.cuda.device_count():
            raise KdcacheError(f"LOCAL_RANK {self.local_rank} has no GPU: this node has "
                               f"{torch.cuda.device_count()}; start at most that many processes per node")
        return torch.device("cuda", self.local_rank)

    def barrier(self) -> None:
        """Wait until every process gets here (nothing to wait for when alone)."""
        if self.enabled:
            tdist.barrier()

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """`values` summed (or their maximum, ``op='max'``) over all processes, elementwise."""
        if not self.enabled:
            return [float(v) for v in values]
        device = torch.device("cuda", self.local_rank) if tdist.get_backend() == "nccl" else torch.device("cpu")
        t = torch.tensor(values, dtype=torch.float64, device=device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX if op == "max" else tdist.ReduceOp.SUM)
        return t.cpu().tolist()

    def shard(self, size: int) -> np.ndarray:
        """This process's rows of ``range(size)``: those with ``row % world_size == rank``, in order."""
        return np.arange(self.rank, size, self.world_size, dtype=np.int64)

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """`model` in DistributedDataParallel when several processes train it, else `model` itself.

        DDP averages the gradients over the processes after each backward, so
        with the global batch split evenly a step equals the one-process step.
        """
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        # Depthwise convolutions (ConvNeXt, PVT) get gradients in another stride order than the flat bucket
        # on CPU; DDP copies them and warns on every rank. Known and harmless (timm issue #2147).
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides",
                                category=UserWarning)
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def init(device: torch.device, timeout: _dt.timedelta | None = None) -> tuple[Dist, torch.device]:
    """This process's place and device; joins the process group when torchrun started several.

    Idempotent: a second call in the same process reuses the group. `timeout`
    bounds how long a collective (a barrier) waits for the slowest process;
    None keeps torch's default.
    """
    d = Dist.from_env()
    device = d.place(device)
    if d.enabled and not tdist.is_initialized():
        if not tdist.is_available():
            raise KdcacheError("this torch build has no torch.distributed; run one process")
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        tdist.init_process_group(backend=backend, timeout=timeout,
                                 device_id=device if device.type == "cuda" else None)
    return d, device


def cleanup() -> None:
    """Leave the process group, if this process is in one."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


@contextmanager
def session() -> Iterator[None]:
    """Leave the process group on exit if it was joined inside (a caller's own group stays)."""
    joined_before = tdist.is_available() and tdist.is_initialized()
    try:
        yield
    finally:
        if not joined_before:
            cleanup()


def tell_launcher(message: str) -> None:
    """Under torchrun, name the error in its failure summary, where it would say "To enable traceback see ...".

    torchrun counts any non-zero exit as a failure and then raises (and
    prints) its own ChildFailedError traceback; no exit status avoids that, so
    the summary's root cause at least carries this line.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        report = {"message": {"message": message, "extraInfo": {"timestamp": str(int(time.time()))}}}
        with contextlib.suppress(OSError):
            with open(path, "w") as f:
                f.write(json.dumps(report))
