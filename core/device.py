"""The one device picker: cuda:<index> when CUDA is there, else the CPU."""
from __future__ import annotations

import os
from .errors import FlagError


def deterministic_kernels() -> None:
    """Deterministic kernels only, so that a rerun or a --resume on a GPU gives the same bits.
    cuDNN and cuBLAS otherwise pick kernels that sum in a varying order, and the zero-order
    estimate (f(x + mu u) - f(x)) / mu magnifies those last-bit differences by 1/mu within a few
    generator steps. An op that has no deterministic kernel warns instead of stopping the run.
    The CPU's kernels already are deterministic for a fixed thread count."""
    import torch
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")     # read when cuBLAS starts
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def pick_device(gpu: int = 0, *, local_rank: int | None = None, world: int = 1, say=None,
                deterministic: bool = False):
    """cuda:<local_rank> under torchrun (one GPU per process), cuda:<gpu> otherwise; the CPU
    without CUDA, where `world` processes split the cores instead of oversubscribing them.
    `say` (optional) is told once when the CPU is used; deterministic: deterministic_kernels()."""
    import torch
    if deterministic:
        deterministic_kernels()
    if torch.cuda.is_available():
        index = local_rank if local_rank is not None and world > 1 else gpu
        n = torch.cuda.device_count()
        if not 0 <= index < n:
            what = f"local rank {index} (one GPU per process)" if world > 1 else f"--gpu {index}"
            raise FlagError(f"{what} but only {n} CUDA device(s) are visible (0..{n - 1})"
                            + ("; use --nproc_per_node <= the number of GPUs" if world > 1 else
                               "; pick another --gpu or set --multigpu / CUDA_VISIBLE_DEVICES"))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if say is not None:
        say("no CUDA device: running on the CPU"
            + (f" ({world} processes, {torch.get_num_threads()} thread(s) each)" if world > 1 else ""))
    return torch.device("cpu")
