"""Pictures of a run: accuracy over meta-iterations, recovered images next to real ones."""
from __future__ import annotations

import json
import os

import matplotlib
matplotlib.use("Agg")          # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

from core.io import atomic_write, load_checkpoint  # noqa: E402
from dataset import get_spec, load_split  # noqa: E402

LABELS = {"bidf_mkd": "BiDf-MKD (black-box, ZO)", "maml_real": "MAML on real data (upper bound)"}


def read_metrics(run: str, split: str) -> list[dict]:
    """The metrics.jsonl lines of one split of a run, for its headline dataset (MH: the mean)."""
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(os.path.join(run, "config.json")) as f:
        dataset = json.load(f)["dataset"]
    headline = "mean" if dataset == "mix" else dataset
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return sorted((r for r in rows if r.get("split") == split and r.get("dataset", headline) == headline),
                  key=lambda r: r["task"])


def accuracy_curves(runs: dict[str, str], path: str, baseline: tuple[float, float] | None = None,
                    title: str = "5-way 1-shot meta-test accuracy") -> None:
    """Meta-test accuracy (with its 95% CI band) over meta-iterations of each run in `runs`
    ({method: run dir}); `baseline` (acc, ci) draws the random-init level."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for method, run in runs.items():
        rows = read_metrics(run, "meta_test")
        if not rows:
            continue
        it = np.array([r["meta_iter"] for r in rows])
        acc = np.array([r["acc"] for r in rows])
        ci = np.array([r["ci"] for r in rows])
        line, = ax.plot(it, acc, marker="o", ms=3, label=LABELS.get(method, method))
        ax.fill_between(it, acc - ci, acc + ci, color=line.get_color(), alpha=0.2)
    if baseline is not None:
        ax.axhline(baseline[0], color="gray", ls="--", label="random-init meta model")
        ax.axhspan(baseline[0] - baseline[1], baseline[0] + baseline[1], color="gray", alpha=0.15)
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def recovered_vs_real(run: str, path: str, n_apis: int = 3, per_class: int = 6) -> bool:
    """For up to `n_apis` APIs of the run's pool whose classes the task memory holds: one row per
    class, `per_class` recovered images (left) next to `per_class` real meta-train images of the same
    class (right). Reads the run's last.pth (memory) and config.json. False if nothing to show."""
    from synthesis.store import pool_dir
    if not os.path.isfile(os.path.join(run, "last.pth")):
        return False
    with open(os.path.join(run, "config.json")) as f:
        cfg = json.load(f)
    ck = load_checkpoint(os.path.join(run, "last.pth"), what="run checkpoint")
    store = ck.get("memory", {}).get("store", {})
    if not store or cfg["dataset"] == "mix":
        return False
    arch = cfg["pre_backbone"] if cfg["pre_backbone"] != "mix" else "conv4"
    pool_json = os.path.join(pool_dir(cfg["pretrained_path_prefix"], cfg["dataset"], arch, cfg["way_pretrain"]),
                             "pool.json")
    with open(pool_json) as f:
        apis = [a for a in json.load(f) if all(int(c) in store for c in a["classes"])][:n_apis]
    if not apis:
        return False
    data = load_split(cfg["data_root"], get_spec(cfg["dataset"]), "meta_train")
    rec, real = [], []
    for a in apis:
        for c in a["classes"]:
            imgs = torch.cat(list(store[int(c)])).float().div(255.0)
            rec.append(imgs[:per_class])
            real.append(data.images(data.indices_of(int(c))[:per_class]))
    grid = lambda xs: make_grid(torch.cat(xs), nrow=per_class, padding=1, pad_value=1.0)  # noqa: E731
    fig, axes = plt.subplots(1, 2, figsize=(2 * 0.55 * per_class + 0.6, 0.55 * len(rec) + 0.8), dpi=120)
    for ax, g, t in zip(axes, (grid(rec), grid(real)), ("recovered from the APIs", "real images, same classes")):
        ax.imshow(g.permute(1, 2, 0).numpy())
        ax.set_title(t, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    side = rec[0].shape[-1] + 1
    way = len(apis[0]["classes"])
    axes[0].set_yticks([side * (i * way + way / 2) for i in range(len(apis))])
    axes[0].set_yticklabels([f"API {a['index']}" for a in apis], fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return True


def accuracy_vs_queries(rows: list[dict], path: str, lines: dict[str, tuple[float, float]] | None = None,
                        title: str = "5-way 1-shot meta-test accuracy against API queries") -> None:
    """Accuracy ± 95% CI against total API queries (log x), one series per `method` of `rows`
    ([{method, queries, acc, ci}]); `lines` ({label: (acc, ci)}) are drawn as horizontal levels."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["queries"])
        ax.errorbar([r["queries"] for r in pts], [r["acc"] for r in pts], yerr=[r["ci"] for r in pts],
                    marker="o", ms=4, capsize=3, label=method)
    _finish_queries_plot(fig, ax, path, lines, "API queries in total (log scale)", "accuracy (%)", title)


def _finish_queries_plot(fig, ax, path: str, lines, xlabel: str, ylabel: str, title: str) -> None:
    """Baselines as horizontal levels (±CI bands), log-scaled queries, labels; written to `path`."""
    for (label, (acc, ci)), color in zip((lines or {}).items(), ("gray", "black", "purple")):
        ax.axhline(acc, color=color, ls="--", lw=1, label=f"{label} ({acc:.1f})")
        ax.axhspan(acc - ci, acc + ci, color=color, alpha=0.12)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())     # crowded labels between decades
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def accuracy_vs_queries_seeds(rows: list[dict], path: str, lines: dict[str, tuple[float, float]] | None = None,
                              title: str = "5-way 1-shot accuracy against API queries, three seeds") -> None:
    """Per row of the curve ({row, method, seed, queries, acc}): each seed's run as a faint dot, and the mean
    over seeds (of queries and of accuracy) as a marker joined per method, with a bar from the lowest seed
    to the highest."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for method, color in zip(dict.fromkeys(r["method"] for r in rows), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        mine = [r for r in rows if r["method"] == method]
        means = []
        for name in dict.fromkeys(r["row"] for r in mine):
            runs = [r for r in mine if r["row"] == name]
            ax.scatter([r["queries"] for r in runs], [r["acc"] for r in runs], s=10, color=color, alpha=0.35)
            accs = [r["acc"] for r in runs]
            means.append((sum(r["queries"] for r in runs) / len(runs), sum(accs) / len(accs), min(accs), max(accs)))
        means.sort()
        ax.errorbar([m[0] for m in means], [m[1] for m in means],
                    yerr=[[m[1] - m[2] for m in means], [m[3] - m[1] for m in means]],
                    marker="o", ms=4, capsize=3, color=color, label=method)
    _finish_queries_plot(fig, ax, path, lines, "API queries in total (log scale; mean over seeds)",
                         "accuracy (%): mean, lowest to highest seed", title)
