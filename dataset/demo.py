"""The embedded demo dataset: procedurally generated, CIFAR-FS shaped (32x32 RGB, 64/16/20 classes).

A class is one (colour, shape, texture) combination out of 8 x 8 x 6: e.g. `c017_red_circle_stripes`
is a red circle filled with stripes. The 100 classes are a fixed random draw of these combinations;
every colour, shape and texture appears in meta_train, so the meta_val/meta_test classes are new
combinations of parts that meta-training has seen: exactly what a meta-learner can transfer.

Per image, at random: the object's position, size, rotation, aspect ratio, hue/saturation/value,
the texture's period, phase and contrast polarity (light or dark second tone), a background of two
random colours in a random gradient, up to five small distractor objects behind the object and
often one in front of it (random shape, texture and colour from the same vocabulary) and pixel
noise. Images are rendered with vectorised numpy (anti-aliased signed-distance shapes) and written
as PNG, deterministic given the seed.

    python -m dataset.demo [--data_root ./DFL2Ldata] [--images_per_class 100] [--seed 0]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import time

import numpy as np
from PIL import Image

try:
    import fcntl
except ImportError:     # not on Windows: no lock, generation is still atomic
    fcntl = None

from core.errors import FlagError

from .filelist import write_csv
from .specs import SPECS, SPLITS

VERSION = 2                     # bump when the rendering changes: old folders are regenerated
DEFAULT_IMAGES_PER_CLASS = 100
SIZE = SPECS["demo"].image_size
RENDER_CHUNK = 300             # images rendered in one vectorised batch (bigger batches fall out of cache)
DESIGN_SEED = 2023              # fixes which combinations are classes (independent of --seed)

COLOURS = {  # name -> hue in [0, 1)
    "red": 0.0, "orange": 0.075, "yellow": 0.15, "green": 0.32,
    "cyan": 0.5, "blue": 0.62, "purple": 0.76, "pink": 0.9,
}
SHAPES = ("circle", "square", "triangle", "hexagon", "ring", "cross", "star", "crescent")
TEXTURES = ("solid", "stripes", "checker", "dots", "rings", "split")


def class_table() -> list[tuple[str, str, str]]:
    """The 100 classes as (colour, shape, texture), in class-id order: 64 meta_train, 16 meta_val,
    20 meta_test. A fixed draw (DESIGN_SEED), so class identities never depend on --seed."""
    combos = list(itertools.product(COLOURS, SHAPES, TEXTURES))
    order = np.random.default_rng(DESIGN_SEED).permutation(len(combos))
    return [combos[i] for i in order[:sum(SPECS["demo"].num_classes)]]


def class_names() -> list[str]:
    return [f"c{k:03d}_{c}_{s}_{t}" for k, (c, s, t) in enumerate(class_table())]


def split_of_class(k: int) -> str:
    n_train, n_val, _ = SPECS["demo"].num_classes
    return SPLITS[0] if k < n_train else (SPLITS[1] if k < n_train + n_val else SPLITS[2])


# --------------------------------------------------------------------------- rendering

def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB; inputs of shape [n] in [0, 1], output [n, 3]."""
    h6 = (h % 1.0) * 6.0
    k = (np.array([5.0, 3.0, 1.0]) + h6[:, None]) % 6.0
    return v[:, None] - (v * s)[:, None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _polygon(u, v, n_sides: int, apothem: float, start: float):
    """Signed distance (approximate outside) to a regular convex polygon: max over its edges."""
    d = None
    for j in range(n_sides):
        a = start + 2.0 * np.pi * j / n_sides
        e = u * np.cos(a) + v * np.sin(a) - apothem
        d = e if d is None else np.maximum(d, e)
    return d


def shape_sdf(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance to the unit-size shape at (u, v) (negative inside), in object radii."""
    r = np.hypot(u, v)
    if shape == "circle":
        return r - 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.8
    if shape == "triangle":
        return _polygon(u, v + 0.15, 3, 0.55, np.pi / 2)
    if shape == "hexagon":
        return _polygon(u, v, 6, 0.88, 0.0)
    if shape == "ring":
        return np.abs(r - 0.72) - 0.28
    if shape == "cross":
        return np.minimum(np.maximum(np.abs(u) - 1.0, np.abs(v) - 0.32),
                          np.maximum(np.abs(u) - 0.32, np.abs(v) - 1.0))
    if shape == "star":
        phi = np.arctan2(v, u)
        return (r - (0.62 + 0.38 * np.cos(5.0 * phi))) * 0.6
    if shape == "crescent":
        return np.maximum(r - 1.0, 0.78 - np.hypot(u - 0.5, v))
    raise ValueError(shape)


def texture_field(texture: str, a, b, period, phase) -> np.ndarray:
    """Mix weight of the second tone in [0, 1] at object-frame pixel coordinates (a, b)."""
    w = 2.0 * np.pi / period
    if texture == "solid":
        return np.zeros_like(a)
    if texture == "stripes":
        s = np.sin(w * a + phase)
    elif texture == "checker":
        s = 2.0 * np.sin(w * a + phase) * np.sin(w * b + 2.0 * phase)
    elif texture == "dots":
        s = 2.0 * (np.cos(0.8 * w * a + phase) * np.cos(0.8 * w * b + phase) - 0.35)
    elif texture == "rings":
        s = np.sin(w * np.hypot(a, b) + phase)
    elif texture == "split":
        s = a / 1.5
    else:
        raise ValueError(texture)
    return np.clip(0.5 + 1.5 * s, 0.0, 1.0)


def draw(img: np.ndarray, layer: dict) -> None:
    """Composite one object per image onto img [n, S, S, 3] float32 (in place). `layer` holds
    per-image arrays: cx, cy, radius (px), angle, aspect, shape, texture (indices), c1, c2 [n, 3],
    period, phase, visible (bool). Only the visible images are rendered."""
    vis = np.flatnonzero(layer["visible"])
    if len(vis) == 0:
        return
    p = {k: np.asarray(v[vis], dtype=np.float32) if k not in ("shape", "texture") else v[vis]
         for k, v in layer.items()}
    col = lambda k: p[k][:, None, None]                       # noqa: E731 (per-image scalar -> [n,1,1])
    grid = np.arange(SIZE, dtype=np.float32) + 0.5
    dx, dy = grid[None, None, :] - col("cx"), grid[None, :, None] - col("cy")
    cos, sin = np.cos(col("angle")), np.sin(col("angle"))
    a, b = cos * dx + sin * dy, cos * dy - sin * dx          # object frame, pixels
    u, v = a / col("radius"), b / (col("radius") * col("aspect"))
    sdf = np.empty_like(a)
    for k in np.unique(p["shape"]):
        m = p["shape"] == k
        sdf[m] = shape_sdf(SHAPES[k], u[m], v[m])
    t = np.empty_like(a)
    for k in np.unique(p["texture"]):
        m = p["texture"] == k
        t[m] = texture_field(TEXTURES[k], a[m], b[m], p["period"][m, None, None], p["phase"][m, None, None])
    alpha = np.clip(0.5 - sdf * col("radius"), 0.0, 1.0)[..., None]   # ~1 px anti-aliasing
    c1, c2 = p["c1"][:, None, None, :], p["c2"][:, None, None, :]
    colour = c1 + (c2 - c1) * t[..., None]
    img[vis] += (colour - img[vis]) * alpha


def _tones(rng: np.random.Generator, hue: np.ndarray, s_range, v_range) -> tuple[np.ndarray, np.ndarray]:
    """Main colour of the given hues (jittered) and its second tone: a light or a dark shade."""
    n = len(hue)
    c1 = hsv_to_rgb(hue + rng.uniform(-0.05, 0.05, n), rng.uniform(*s_range, n), rng.uniform(*v_range, n))
    light = rng.random(n) < 0.5
    c2 = np.where(light[:, None], 1.0 - 0.35 * (1.0 - c1), c1 * 0.3)
    return c1, c2


def _layer(rng, n, *, shape, texture, hue, radius, centre, visible, s_range=(0.6, 1.0), v_range=(0.6, 1.0)):
    c1, c2 = _tones(rng, hue, s_range, v_range)
    return dict(cx=rng.uniform(*centre, n), cy=rng.uniform(*centre, n), radius=rng.uniform(*radius, n),
                angle=rng.uniform(0.0, 2.0 * np.pi, n), aspect=np.exp(rng.uniform(-0.2, 0.2, n)),
                shape=shape, texture=texture, c1=c1, c2=c2, period=rng.uniform(3.6, 5.4, n),
                phase=rng.uniform(0.0, 2.0 * np.pi, n), visible=visible)


def _random_layer(rng, n, radius, p_visible):
    """A distractor: random shape, texture and colour from the same vocabulary as the classes."""
    hues = np.array(list(COLOURS.values()))
    return _layer(rng, n, shape=rng.integers(0, len(SHAPES), n), texture=rng.integers(0, len(TEXTURES), n),
                  hue=hues[rng.integers(0, len(hues), n)], radius=radius, centre=(0.0, SIZE),
                  visible=rng.random(n) < p_visible, s_range=(0.3, 1.0), v_range=(0.3, 1.0))


def class_scenes(colour: str, shape: str, texture: str, n: int, rng: np.random.Generator) -> dict:
    """Every random choice of n images of one class (the only place that draws random numbers):
    background colours and gradient direction, six object layers (five possible distractors
    behind the class object, one possible occluder in front) and the pixel noise."""
    hue = lambda: rng.random(n)                                     # noqa: E731
    scene = dict(g0=hsv_to_rgb(hue(), rng.uniform(0.0, 0.6, n), rng.uniform(0.2, 0.9, n)),
                 g1=hsv_to_rgb(hue(), rng.uniform(0.0, 0.6, n), rng.uniform(0.2, 0.9, n)),
                 theta=rng.uniform(0.0, 2.0 * np.pi, n))
    layers = [_random_layer(rng, n, radius=(2.5, 7.0), p_visible=0.6) for _ in range(5)]   # clutter
    layers.append(_layer(rng, n, shape=np.full(n, SHAPES.index(shape)), texture=np.full(n, TEXTURES.index(texture)),
                         hue=np.full(n, COLOURS[colour]), radius=(5.5, 10.0), centre=(9.0, 23.0),
                         visible=np.ones(n, dtype=bool), s_range=(0.4, 1.0), v_range=(0.45, 1.0)))
    layers.append(_random_layer(rng, n, radius=(2.5, 5.5), p_visible=0.6))                 # occluder
    scene["layers"] = layers
    sigma = rng.uniform(0.04, 0.10, n).astype(np.float32)[:, None, None, None]
    scene["noise"] = rng.standard_normal((n, SIZE, SIZE, 3), dtype=np.float32) * sigma
    return scene


def concat_scenes(scenes: list[dict]) -> dict:
    """One batch of scenes from several (rendering many classes at once is cheaper)."""
    cat = lambda key, group: np.concatenate([g[key] for g in group])   # noqa: E731
    out = {k: cat(k, scenes) for k in scenes[0] if k != "layers"}
    out["layers"] = [{k: cat(k, [s["layers"][i] for s in scenes]) for k in scenes[0]["layers"][i]}
                     for i in range(len(scenes[0]["layers"]))]
    return out


def render(scene: dict) -> np.ndarray:
    """The images of a batch of scenes, uint8 [n, S, S, 3]."""
    theta = scene["theta"][:, None, None]
    grid = (np.arange(SIZE) + 0.5) / SIZE - 0.5
    ramp = np.clip(np.cos(theta) * grid[None, None, :] + np.sin(theta) * grid[None, :, None] + 0.5, 0.0, 1.0)
    ramp = ramp[..., None]
    img = (scene["g0"][:, None, None, :] * (1.0 - ramp) + scene["g1"][:, None, None, :] * ramp).astype(np.float32)
    for layer in scene["layers"]:
        draw(img, layer)
    img += scene["noise"]
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- the dataset on disk

def _marker_ok(folder: str, images_per_class: int | None, seed: int | None) -> bool:
    try:
        with open(os.path.join(folder, "demo.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return (meta.get("version") == VERSION
            and (images_per_class is None or meta.get("images_per_class") == images_per_class)
            and (seed is None or meta.get("seed") == seed)
            and all(os.path.isfile(os.path.join(folder, "split", f"{s}.csv")) for s in SPLITS))


def generate(out_dir: str, images_per_class: int, seed: int, progress: bool = True) -> dict:
    """Render every class into out_dir/<split>/<class>/<k>.png and write out_dir/split/*.csv, with
    filenames relative to out_dir's parent (the data root), like the filelist scripts."""
    from tqdm import tqdm
    folder = SPECS["demo"].folder
    rows = {s: [] for s in SPLITS}
    names, table = class_names(), class_table()
    per_chunk = max(1, RENDER_CHUNK // images_per_class)          # classes rendered together
    bar = tqdm(total=len(table), desc="demo dataset", unit="class", disable=not progress, leave=False)
    for first in range(0, len(table), per_chunk):
        ks = range(first, min(first + per_chunk, len(table)))
        images = render(concat_scenes([class_scenes(*table[k], images_per_class, np.random.default_rng([seed, k]))
                                       for k in ks]))
        for j, k in enumerate(ks):
            split = split_of_class(k)
            class_dir = os.path.join(out_dir, split, names[k])
            os.makedirs(class_dir)
            for i, im in enumerate(images[j * images_per_class:(j + 1) * images_per_class]):
                Image.fromarray(im).save(os.path.join(class_dir, f"{i:04d}.png"))
                rows[split].append((f"{folder}/{split}/{names[k]}/{i:04d}.png", names[k]))
            bar.update()
    bar.close()
    for split in SPLITS:
        write_csv(os.path.join(out_dir, "split", f"{split}.csv"), rows[split])
    return dict(version=VERSION, images_per_class=images_per_class, seed=seed, image_size=SIZE,
                classes={s: len({r[1] for r in rows[s]}) for s in SPLITS},
                colours=list(COLOURS), shapes=list(SHAPES), textures=list(TEXTURES))


def ensure_demo(data_root: str, images_per_class: int | None = None, seed: int | None = None,
                progress: bool = True) -> str:
    """Make sure <data_root>/demo holds the demo dataset and return that folder.

    No-op when its marker (demo/demo.json) matches: images_per_class and seed, when given, equal
    the marker's. Otherwise generate it (default DEFAULT_IMAGES_PER_CLASS images per class, seed 0)
    into a temporary folder and rename it into place, so an interrupted run never leaves a
    half dataset that looks complete. A lock file serialises concurrent callers (e.g. torchrun ranks).
    """
    if images_per_class is not None and images_per_class < 1:
        raise FlagError(f"--images_per_class must be at least 1, got {images_per_class}")
    folder = os.path.join(data_root, SPECS["demo"].folder)
    if _marker_ok(folder, images_per_class, seed):
        return folder
    os.makedirs(data_root, exist_ok=True)
    with open(os.path.join(data_root, ".demo.lock"), "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        if _marker_ok(folder, images_per_class, seed):     # another process made it meanwhile
            return folder
        n = DEFAULT_IMAGES_PER_CLASS if images_per_class is None else images_per_class
        s = 0 if seed is None else seed
        for stale in os.listdir(data_root):                # left by an interrupted run (we hold the lock)
            if stale.startswith((".demo.tmp", ".demo.old")):
                shutil.rmtree(os.path.join(data_root, stale), ignore_errors=True)
        tmp = os.path.join(data_root, f".demo.tmp{os.getpid()}")
        start = time.time()
        print(f"generating the demo dataset in {folder} ({n} images per class, seed {s})", flush=True)
        meta = generate(tmp, n, s, progress)
        meta["seconds"] = round(time.time() - start, 2)
        with open(os.path.join(tmp, "demo.json"), "w") as f:
            json.dump(meta, f, indent=1)
        if os.path.exists(folder):                          # stale (other size/seed/version): replace
            old = os.path.join(data_root, f".demo.old{os.getpid()}")
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
        print(f"demo dataset ready: {sum(meta['classes'].values())} classes x {n} images "
              f"in {meta['seconds']:.1f}s", flush=True)
    return folder


def preview(folder: str, path: str, n_classes: int = 10, per_class: int = 10, zoom: int = 2) -> None:
    """A picture of the dataset: one row per class (evenly spaced over all classes), named."""
    from PIL import ImageDraw
    names = class_names()
    rows = [names[round(i * (len(names) - 1) / max(1, n_classes - 1))] for i in range(n_classes)]
    cell, label = SIZE * zoom, 165
    sheet = Image.new("RGB", (label + per_class * cell, n_classes * cell), "white")
    pen = ImageDraw.Draw(sheet)
    for r, name in enumerate(rows):
        class_dir = os.path.join(folder, split_of_class(int(name[1:4])), name)
        files = sorted(os.listdir(class_dir))[:per_class]
        pen.text((6, r * cell + cell // 2 - 6), name, fill="black")
        for c, f in enumerate(files):
            img = Image.open(os.path.join(class_dir, f)).convert("RGB").resize((cell, cell), Image.NEAREST)
            sheet.paste(img, (label + c * cell, r * cell))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sheet.save(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Generate the demo dataset (CIFAR-FS shaped, 64/16/20 classes of "
                                            "32x32 RGB images) with its split CSVs.")
    p.add_argument("--data_root", default="./DFL2Ldata", help="folder holding the datasets (default ./DFL2Ldata)")
    p.add_argument("--images_per_class", type=int, default=None,
                   help=f"images per class (default {DEFAULT_IMAGES_PER_CLASS}, or what is already there)")
    p.add_argument("--seed", type=int, default=None, help="image seed (default 0, or what is already there)")
    p.add_argument("--preview", default=None, metavar="PNG", help="also save a picture of 10 classes here")
    args = p.parse_args(argv)
    folder = ensure_demo(args.data_root, args.images_per_class, args.seed)
    with open(os.path.join(folder, "demo.json")) as f:
        meta = json.load(f)
    print(f"{folder}: {'/'.join(str(meta['classes'][s]) for s in SPLITS)} classes "
          f"({', '.join(SPLITS)}), {meta['images_per_class']} images per class, seed {meta['seed']}")
    if args.preview:
        preview(folder, args.preview)
        print(f"preview: {args.preview}")


if __name__ == "__main__":
    from core.cli import run
    run(main)
