"""The processes of one run under torchrun: where this one sits, and the few collectives the
meta-training loop needs. Without torchrun (or with one process) every call is a cheap no-op,
so the loop reads the same either way.

    torchrun --standalone --nproc_per_node N main.py <flags>     NCCL on GPUs (one per process), gloo on CPUs
    task i of a meta-batch runs on rank i % N; the per-task meta-gradients are all-reduced (SUM)
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from datetime import timedelta


@dataclass
class Dist:
    """Where this process sits in a torchrun launch (rank 0 of 1 without torchrun)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @staticmethod
    def from_env() -> "Dist":
        env = os.environ
        world = int(env.get("WORLD_SIZE", 1))
        return Dist(int(env.get("RANK", 0)), world, int(env.get("LOCAL_RANK", 0)),
                    int(env.get("LOCAL_WORLD_SIZE", world)))

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run's outputs and prints."""
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Item `index` (a task of a meta-batch, an evaluation task, an API to pretrain) is this rank's."""
        return index % self.world == self.rank


class PeerLost(Exception):
    """Another process of the run ended (torchrun stops the rest, or a collective lost its peer)."""


def init(dist: Dist, device) -> None:
    """Join the process group (NCCL on a GPU, gloo on the CPU); a SIGTERM from torchrun, which stops
    the other processes when one dies, becomes PeerLost so that the run can say what is kept."""
    import torch.distributed as td
    if dist.world <= 1 or td.is_initialized():
        return
    if device.type == "cuda":
        td.init_process_group("nccl", device_id=device)
    else:
        td.init_process_group("gloo")

    def stop(signum, frame):
        raise PeerLost("another process of this run ended")
    signal.signal(signal.SIGTERM, stop)


def close(dist: Dist) -> None:
    """Leave the process group together: the barrier first, so that no process tears its connections
    down while another still sends to it (gloo then aborts the late process at exit)."""
    import torch.distributed as td
    if dist.world > 1 and td.is_initialized():
        td.barrier()
        td.destroy_process_group()


def lost_peer(e: BaseException) -> bool:
    """Is `e` what a collective raises when another process of the run died?"""
    import torch.distributed as td
    return isinstance(e, (PeerLost, td.DistError)) or (isinstance(e, RuntimeError) and "gloo" in str(e).lower())


def first_to_report() -> bool:
    """True in exactly one surviving process (torchrun's agent keeps the key-value store alive when a
    worker dies), so that a stopped run prints one line, not one per process; True when unsure."""
    try:
        import torch.distributed as td
        from torch.distributed.distributed_c10d import _get_default_store   # noqa: PLC2701 - no public getter
        store = _get_default_store()
        store.set_timeout(timedelta(seconds=5))
        return store.add("bidf_stopped", 1) == 1 if td.is_initialized() else True
    except Exception:       # noqa: BLE001 - the store went with the dead process: report anyway
        return True


def all_sum(t, dist: Dist):
    """t summed over the processes, in place (every process ends with the same tensor)."""
    if dist.world > 1:
        import torch.distributed as td
        td.all_reduce(t, op=td.ReduceOp.SUM)
    return t


def gather(obj, dist: Dist) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every process (picklable objects; tensors on the CPU)."""
    if dist.world <= 1:
        return [obj]
    import torch.distributed as td
    out = [None] * dist.world
    td.all_gather_object(out, obj)
    return out


def gather_items(items: dict, dist: Dist) -> dict:
    """{index: value} of every process merged, sorted by index: each process owned some of the indices."""
    merged = {}
    for part in gather(items, dist):
        merged.update(part)
    return dict(sorted(merged.items()))


def broadcast(obj, dist: Dist, src: int = 0):
    """Rank src's obj on every process."""
    if dist.world <= 1:
        return obj
    import torch.distributed as td
    box = [obj]
    td.broadcast_object_list(box, src=src)
    return box[0]


def on_main(fn, dist: Dist):
    """fn() on rank 0 only (the run directory is its), its result handed to every process; an error
    there is raised on every process, so that all stop alike."""
    result, error = None, None
    if dist.is_main:
        try:
            result = fn()
        except Exception as e:      # noqa: BLE001 - re-raised below, on every rank
            error = e
    result, error = broadcast((result, error), dist)
    if error is not None:
        raise error
    return result
