"""What a run logs of its API visits (TensorBoard, kd/* and api/*): how well the meta model fits the API,
how sure the API is of the recovered images, how diverse they are, and the images themselves."""
from __future__ import annotations

import numpy as np
import torch


def class_diversity(x: torch.Tensor, labels: torch.Tensor) -> dict[int, float]:
    """{class: RMS pixel distance between two of its images, averaged over all pairs}:
    sqrt(mean_{i<j} |x_i - x_j|^2 / d). 0 when a class collapsed to one image; a diagnostic only."""
    out = {}
    for c in labels.unique().tolist():
        xc = x[labels == c].flatten(1).float()
        n = xc.shape[0]
        if n < 2:
            continue
        d2 = torch.cdist(xc, xc).pow(2)
        out[int(c)] = float((d2.sum() / (n * (n - 1)) / xc.shape[1]).sqrt())
    return out


def log_visit(tb, r: dict, task_id: int, visits: int, queries: int) -> None:
    """One finished visit's record (methods/meta_train.py `visit`) as TensorBoard scalars and images."""
    tb.add_scalar("kd/kl_query_before_inner", r["kl_before"], task_id)
    tb.add_scalar("kd/outer_loss", r["loss"], task_id)
    tb.add_scalar("kd/acc_query", r["acc"], task_id)
    tb.add_scalar("kd/api_confidence", r["api_confidence"], task_id)
    tb.add_scalar("kd/api_agreement", r["api_agreement"], task_id)   # images the API assigns to their target
    tb.add_scalar("api/visits", visits, task_id)
    tb.add_scalar("api/queries", queries, task_id)
    if r["verdict"] is not None:        # --api_trust
        for k in ("sharpness", "agreement", "trusted"):
            if r["verdict"][k] is not None:
                tb.add_scalar(f"trust/{k}", float(r["verdict"][k]), task_id)
    tb.add_scalar("kd/seconds_per_visit", r["seconds"], task_id)
    tb.add_scalar("kd/queries_per_visit", sum(r["queries"].values()), task_id)
    tb.add_scalar("kd/recovery_steps_per_visit", r["recovery_steps"], task_id)
    if r["support"] is None:            # dropped by --api_trust: nothing recovered to show
        return
    (sx, sy), (qx, qy) = r["support"], r["query"]
    div = class_diversity(torch.cat([sx, qx]), torch.cat([sy, qy]))
    if div:
        tb.add_scalar("kd/class_diversity_mean", float(np.mean(list(div.values()))), task_id)
        tb.add_scalar("kd/class_diversity_min", min(div.values()), task_id)
    log_images(tb, r["support"], r["query"], r["way"], task_id)     # grouped by target (labels: memory_labels)


def log_images(tb, support, query, way: int, task_id: int) -> None:
    """Recovered support and query images, one row per class (at most 8 per class)."""
    from torchvision.utils import make_grid
    for name, (x, _) in (("support", support), ("query", query)):
        per = x.shape[0] // way
        k = min(per, 8)
        pick = x.view(way, per, *x.shape[1:])[:, :k].reshape(way * k, *x.shape[1:])
        tb.add_image(f"recovered/{name}", make_grid(pick.float().cpu(), nrow=k), task_id)
