"""Host input-pipeline throughput: ``python -m cpsl_jax.data.benchmark [--quick] [--workers N]``.

Writes a few full-size synthetic PNG pairs in the GTA5 (1914x1052) and Cityscapes
(2048x1024) layouts to a temporary folder, then times the host pipeline (read, PNG
decode, label map, resize to the 2048x1024 base size, batch) through the grain loader and
prints images/s per CPU core as a table naming the machine. Images are smooth fields
plus noise, so PNG sizes and decode costs are closer to photographs than pure noise.
Rows timing the device augmentation (``augment.py``: colour transfer, weak and strong
view) on the current JAX backend follow.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import tempfile
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from cpsl_jax.data import layouts, open_dataset
from cpsl_jax.data.augment import sample_strong, sample_weak, strong_view, weak_view
from cpsl_jax.data.color import lab_mean_std, lab_transfer
from cpsl_jax.data.pipeline import LoaderOptions, val_loader

# (dataset, file size (W, H)) of the two layouts timed.
CASES = (("gta5", (1914, 1052)), ("cityscapes", (2048, 1024)))


def _photo_like(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """(h, w, 3) uint8: a bilinear-upsampled coarse random field plus mild noise."""
    coarse = rng.integers(0, 256, (max(h // 64, 2), max(w // 64, 2), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), np.int16)
    return np.clip(smooth + rng.integers(-12, 13, (h, w, 3)), 0, 255).astype(np.uint8)


def _label_like(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """(h, w) uint8 label ids in blocks (real label maps are piecewise constant)."""
    coarse = rng.integers(0, 34, (max(h // 32, 2), max(w // 32, 2)), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.NEAREST))


def write_fake_dataset(dataset: str, root: str, size: tuple[int, int], count: int,
                       seed: int = 0) -> None:
    """Write ``count`` pairs of file size ``size`` (W, H) in ``dataset``'s folder layout."""
    rng = np.random.default_rng(seed)
    w, h = size
    for k in range(count):
        if dataset == "gta5":
            image_path = os.path.join(root, "images", f"{k + 1:05d}.png")
            label_path = os.path.join(root, "labels", f"{k + 1:05d}.png")
        else:
            name = f"bench_{k:06d}_000019"
            image_path = os.path.join(root, "leftImg8bit", "train", "bench", name + "_leftImg8bit.png")
            label_path = os.path.join(root, "gtFine", "train", "bench", name + "_gtFine_labelIds.png")
        for path, array in ((image_path, _photo_like(rng, w, h)), (label_path, _label_like(rng, w, h))):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.fromarray(array).save(path)


def time_pipeline(dataset: str, root: str, base_size: tuple[int, int], batch_size: int,
                  workers: int) -> dict[str, Any]:
    """One timed pass of the loader over every pair, one reading thread per process.

    With ``workers`` = 0 everything runs in this process on (about) one core; with N
    workers images/s is divided by N for the per-core figure.
    """
    source = open_dataset(dataset, root, "train", 19, base_size=base_size)
    source[0]  # warm-up outside the timing: imports, first allocation
    options = LoaderOptions(batch_size=batch_size, worker_count=workers, read_threads=1,
                            read_buffer=2 * batch_size)
    start, images = time.perf_counter(), 0
    for batch in iter(val_loader(source, options, process_count=1)):
        images += int(batch["valid"].sum())
    seconds = time.perf_counter() - start
    per_second = images / seconds
    return {"stage": f"host {dataset}", "input": "x".join(map(str, base_size)),
            "workers": workers, "images": images, "seconds": round(seconds, 3),
            "images/s": round(per_second, 2), "images/s/core": round(per_second / max(workers, 1), 2)}


def host_rows(quick: bool = False, workers: Sequence[int] = (0,), count: int = 16,
              batch_size: int = 4) -> list[dict[str, Any]]:
    """Rows for both layouts; quick: 1/8-size files, 4 images, for tests."""
    rows = []
    scale, count = (8, 4) if quick else (1, count)
    with tempfile.TemporaryDirectory() as tmp:
        for dataset, (w, h) in CASES:
            root = os.path.join(tmp, dataset)
            write_fake_dataset(dataset, root, (w // scale, h // scale), count)
            base = layouts.BASE_SIZE[dataset]
            base = (base[0] // scale, base[1] // scale)
            for n in workers:
                rows.append(time_pipeline(dataset, root, base, 1 if quick else batch_size, n))
    return rows


def _time(fn, *args, reps: int) -> float:
    """Seconds per call of ``fn(*args)``, after one call that compiles and warms up."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(reps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / reps


def augment_rows(batch: int = 4, quick: bool = False) -> list[dict[str, Any]]:
    """Time the device augmentation on the current backend; one row per stage.

    Full sizes: colour transfer at 1024x2048, weak view 1024x2048 -> 512x896, strong view
    at 512x896. ``quick`` shrinks every size by 4 and repeats less (for tests and CPUs).
    Rows: ``{'stage', 'size', 'batch', 'backend', 'ms_per_batch', 'images_per_s'}``.
    """
    div = 4 if quick else 1
    reps = 2 if quick else 10
    base_hw = (1024 // div, 2048 // div)
    crop_hw = (512 // div, 896 // div)
    key = jax.random.PRNGKey(0)
    k_img, k_tgt, k_weak, k_strong = jax.random.split(key, 4)
    images = jax.random.randint(k_img, (batch,) + base_hw + (3,), 0, 256).astype(jnp.uint8)
    targets = jax.random.randint(k_tgt, (batch,) + base_hw + (3,), 0, 256).astype(jnp.uint8)
    mean, std = jax.jit(lab_mean_std)(targets)
    weak = sample_weak(k_weak, batch, base_hw, crop_hw, base_width=int(math.ceil(2200 / div)))
    crops = jax.jit(weak_view)(images, weak)
    strong = sample_strong(k_strong, batch, crop_hw)
    rows = []
    for stage, fn, args, size in (
        ("lab_transfer", jax.jit(lab_transfer), (images, mean, std), base_hw),
        ("weak_view", jax.jit(weak_view), (images, weak), crop_hw),
        ("strong_view", jax.jit(strong_view), (crops, strong), crop_hw),
    ):
        sec = _time(fn, *args, reps=reps)
        rows.append({"stage": stage, "size": f"{size[0]}x{size[1]}", "batch": batch,
                     "backend": jax.default_backend(), "ms_per_batch": 1e3 * sec,
                     "images_per_s": batch / sec})
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Plain-text table of ``rows`` (union of their keys as columns)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.rjust(w) for v, w in zip(values, widths))
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def machine_line() -> str:
    return (f"machine: {platform.processor() or platform.machine()} ({platform.machine()}), "
            f"{os.cpu_count()} CPUs, {platform.system()} {platform.release()}")


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny images (for tests)")
    parser.add_argument("--workers", type=int, nargs="*", default=[0],
                        help="grain worker counts to time (0: main process, one core)")
    parser.add_argument("--count", type=int, default=16, help="images per layout")
    args = parser.parse_args(argv)
    rows = host_rows(args.quick, args.workers, args.count) + augment_rows(quick=args.quick)
    text = machine_line() + "\n" + format_table(rows)
    print(text)
    return text


if __name__ == "__main__":
    main()
