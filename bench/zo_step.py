"""Benchmark: one zero-order generator step at the paper's geometry (compare with the original: bench/RESULTS.md).

    python bench/zo_step.py                      # 5 classes x 30 images, 32x32, conv4 API, q=100, numsplit 5
    python bench/zo_step.py --numsplit 1 --steps 3
    python bench/zo_step.py --pool ./pretrained_blackbox --dataset cifar100 --arch conv4 --api 0

A step is what recover() does each iteration in ZO mode: G(z) -> augment -> (q + 1) API queries per
image -> estimate -> surrogate backward -> Adam. Without --pool the API is a randomly initialised
network with random batch-norm statistics (speed does not depend on the weights). Prints one JSON line:
  images_per_s      API images queried per second over the timed steps (warm-up excluded)
  peak_mem_mb       CPU: peak RSS during warm-up + timed steps minus RSS before them (the process's
                    high-water mark, getrusage); CUDA: torch.cuda.max_memory_allocated
  api_forward_share fraction of the timed wall time spent inside the API forward (with lanes running
                    at once: the API's thread-seconds over the lanes' wall-seconds)
plus the settings, wall and CPU seconds per step and images per CPU-second (CPU time summed over
threads; on a busy machine wall time overstates the cost, and with --threads 1 images_per_cpu_s is
the throughput of one unshared core), the process's absolute peak RSS, OMP_WAIT_POLICY and the load
average at the end (the machine may be shared).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from accel.process import setup_process  # noqa: E402

setup_process()     # passive OpenMP waiting and glibc's malloc, before torch loads (as every entry point)

import torch  # noqa: E402

import accel  # noqa: E402
from accel.lanes import ZO_LANES  # noqa: E402
import network  # noqa: E402
from core.config import Config  # noqa: E402
from core.errors import BidfError  # noqa: E402
from dataset.specs import get_spec  # noqa: E402
from synthesis.api import BlackBoxAPI  # noqa: E402
from synthesis.recover import recover  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux: KiB


def random_api(arch: str, way: int, image_size: int, device, seed: int, **kw) -> BlackBoxAPI:
    torch.manual_seed(seed)
    model = network.build(arch, way, image_size=image_size).eval()
    for m in model.modules():       # non-trivial statistics, so the folded forward does real work
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1); m.running_var.uniform_(0.5, 2.0)
    spec = dataclasses.replace(get_spec("cifar100"), image_size=image_size)
    return BlackBoxAPI(model, list(range(way)), spec, arch, device=device, **kw)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--q", type=int, default=100)
    p.add_argument("--mu", type=float, default=0.005)
    p.add_argument("--numsplit", type=int, default=5)
    p.add_argument("--per_class", "--batch", dest="per_class", type=int, default=30, help="images per class")
    p.add_argument("--way", type=int, default=5)
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--arch", default="conv4", choices=["conv4", "resnet10", "resnet18"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--compile", action="store_true", help="torch.compile the API forward")
    p.add_argument("--plain_api", action="store_true",
                   help="no batch-norm folding, NCHW, no micro-batches, and each chunk of directions in one "
                        "piece, one after another (what an unoptimised wrapper and loop do)")
    p.add_argument("--lanes", type=int, default=ZO_LANES,
                   help="blocks per chunk of directions, run at once in threads (accel/lanes.py; 1: in turn)")
    p.add_argument("--no_mkldnn", action="store_true", help="dense channels-last forward instead of oneDNN tensors")
    p.add_argument("--micro_batch", type=int, default=-1, help="images per API forward (-1: default)")
    p.add_argument("--pool", default=None, help="benchmark a pretrained API: pool prefix")
    p.add_argument("--dataset", default="cifar100")
    p.add_argument("--api", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    fast = (dict(fold_bn=False, channels_last=False, micro_batch=None, mkldnn=False) if a.plain_api
            else dict(micro_batch=a.micro_batch, mkldnn=False if a.no_mkldnn else None))

    t_build = time.perf_counter()
    if a.pool:
        from synthesis.api import load_api
        from synthesis.store import api_files, pool_dir
        files = api_files(pool_dir(a.pool, a.dataset, a.arch, a.way))
        if a.api not in files:
            raise BidfError(f"no API {a.api} in {pool_dir(a.pool, a.dataset, a.arch, a.way)}")
        api = load_api(files[a.api], device, compile=a.compile, expect={"dataset": a.dataset, "arch": a.arch})
    else:
        api = random_api(a.arch, a.way, a.image_size, device, a.seed, speed={**fast, "compile": a.compile})
    build_s = time.perf_counter() - t_build
    lanes = 1 if a.plain_api else a.lanes
    cfg = Config(ZO=True, q=a.q, mu=a.mu, numsplit=a.numsplit)
    gen = torch.Generator(device=device).manual_seed(a.seed)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss0 = rss_mb()
    with accel.zo_lanes(lanes):
        if a.warmup:
            recover(api, a.per_class, cfg, steps=a.warmup, generator=gen)
        api.timing = True
        q0, api.forward_seconds = api.queries, 0.0
        concurrent = min(lanes, torch.get_num_threads()) if device.type == "cpu" else 1
        t0, c0 = time.perf_counter(), time.process_time()
        recover(api, a.per_class, cfg, steps=a.steps, generator=gen)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 20
    else:
        peak = peak_rss_mb() - rss0
    out = {"images_per_s": round((api.queries - q0) / dt, 1), "peak_mem_mb": round(peak, 1),
           # lanes query at once: the API's thread-seconds over the lanes' wall-seconds
           "api_forward_share": round(api.forward_seconds / (dt * concurrent), 3),
           "seconds_per_step": round(dt / a.steps, 3),
           "cpu_seconds_per_step": round(cpu / a.steps, 3),
           "images_per_cpu_s": round((api.queries - q0) / cpu, 1), "peak_rss_mb": round(peak_rss_mb(), 1), "images_per_step": (api.queries - q0) // a.steps,
           "q": a.q, "numsplit": a.numsplit, "batch": a.way * a.per_class, "image_size": api.spec.image_size,
           "arch": api.arch, "device": str(device), "threads": torch.get_num_threads(),
           "api": "plain" if a.plain_api else ("compile" if a.compile else ("dense" if a.no_mkldnn else "fast")),
           "lanes": lanes,
           "api_build_s": round(build_s, 1), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
           "loadavg": [round(v, 2) for v in os.getloadavg()]}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    from core.cli import run
    run(main)
