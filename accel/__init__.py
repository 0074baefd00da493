"""How fast the method runs, and nothing else: kernels, memory layouts, threads, task executors.

The modules of the method (synthesis/, methods/, network/) reach speed machinery only through the names
below; none of them changes what is computed beyond float rounding where a docstring says so (and not
at all where it says bit for bit). Figures behind every choice: bench/RESULTS.md.

    setup_process()                     entry points, before torch loads: OpenMP waits passively,
                                        glibc's malloc keeps freed memory            (process.py)
    api_forward(model, device, ...)     an API's network as a fast frozen function     (inference.py)
    fast_layout(obj), match_layout(t, ref), memory_order(x)
                                        the memory layout convolutions run fastest in  (layout.py)
    affine_normalizer(mean, std, ...)   per-channel normalisation as one fused op      (layout.py)
    cpu_threads(n)                      torch's CPU threads inside a block             (lanes.py)
    direction_blocks(q, numsplit, device), sum_in_order(fn, blocks, out)
                                        the blocks of a zero-order step, run side by side on the CPU
    zo_lanes(n)                         blocks per chunk inside a block (benchmarks)   (lanes.py)
    parse_task_exec(spec), choose(spec, device, world) -> TaskExec;  map_tasks(...), grad_tasks(...)
                                        how a batch of tasks runs: sequential | lanes | vmap (executors.py)
    param_grad(loss_of, params, create_graph)
                                        the inner loop's gradient, in the form the executor needs

Names load on first use, so `accel.process` can run before torch is imported.
"""
import importlib

_HOME = {
    "setup_process": "process",
    "api_forward": ("inference", "inference_forward"),
    "fast_layout": "layout", "match_layout": "layout", "memory_order": "layout", "affine_normalizer": "layout",
    "cpu_threads": "lanes", "direction_blocks": "lanes", "sum_in_order": "lanes", "zo_lanes": "lanes",
    "TaskExec": "executors", "choose": "executors", "map_tasks": "executors", "grad_tasks": "executors",
    "parse_task_exec": ("executors", "parse"), "param_grad": "executors",
}
__all__ = list(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _HOME[name] if isinstance(_HOME[name], tuple) else (_HOME[name], name)
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value
