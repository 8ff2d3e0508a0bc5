"""Commands over a trained model that make the artifacts of the next stage, and evaluation.

Each runs data-parallel over all devices (and hosts: every host handles its shard of the
images and writes its own files), shows a progress bar, and writes into the workdir or the
pseudo-label store (``config.data.pseudo_labels``):

* ``lab_stats``: CIELAB per-channel mean and std of every target training image
  (``<workdir>/lab_stats.npy``, N x 2 x 3), used by the source colour transfer;
* ``soft_labels``: the model's softmax at output resolution for every target training
  image (C x 129 x 257 at 1024x2048), eval mode, no flip; with
  ``data.soft_labels_from_ground_truth`` the ground truth's class fractions on the same grid
  instead (``true_soft_label``: what stage 1 reaches with perfect pseudo labels);
* ``prototypes``: initial prototypes, ``passes`` passes of class-mean features with the
  running mean capped at 3000 contributions (``<workdir>/prototypes.npy``, C x D);
* ``class_distribution``: fraction of target training pixels predicted as each class
  (``<workdir>/class_distribution.npy``);
* ``hard_labels``: argmax of the softmax averaged over the image and its flip at full
  resolution, with its float16 confidence;
* ``eval``: mIoU, per-class IoU and pixel accuracy on the target val split, with coloured
  predictions of a few images; works on a published reference ``.pkl`` as is. With
  ``eval.target_statistics`` the BatchNorm statistics are first re-estimated on the target
  training images (``target_statistics``, the AdaBN baseline).
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from cpsl_jax import cpsl, evaluate, ops, visualize
from cpsl_jax.data import color, layouts, pipeline
from cpsl_jax.data.pseudo_labels import PseudoLabelStore
from cpsl_jax.train import parallel
from cpsl_jax.train import state as state_lib
from cpsl_jax.train.io import load_variables, open_split
from cpsl_jax.train.logger import MetricWriter, setup_logging
from cpsl_jax.train.loop import evaluate_variables

log = logging.getLogger(__name__)
PROTOTYPE_PASSES = 4  # the reference runs 4 passes over the target training images


def _map_dataset(fn: Callable, variables: Any, dataset, config: mlc.ConfigDict, mesh,
                 desc: str) -> Iterator[tuple[dict, dict]]:
    """Yield ``(host batch, per-image outputs on the host)`` for every batch of ``dataset`` in order.

    ``fn(variables, batch) -> dict of (b, ...)`` is per-device code; padded entries of the
    last batch carry ``valid=False``.
    """
    options = pipeline.LoaderOptions(batch_size=pipeline.host_batch_size(config.data.eval_batch_size),
                                     worker_count=config.data.worker_count)
    loader = pipeline.val_loader(dataset, options)
    compiled = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(parallel.AXIS)), out_specs=P(parallel.AXIS),
                                     check_vma=False))
    variables = parallel.replicate(variables, mesh)
    total = -(-len(dataset) // config.data.eval_batch_size)
    for host in tqdm(loader, total=total, desc=desc, disable=jax.process_index() != 0):
        batch = parallel.shard_batch({k: host[k] for k in ("image",)}, mesh)
        out = compiled(variables, batch)
        local = jax.tree.map(lambda a: np.concatenate([np.asarray(s.data) for s in a.addressable_shards]), out)
        yield host, local


def _output(configured: str, default: Path) -> Path:
    """Where a tool writes an artifact: the path the config names for it, else the workdir."""
    path = Path(configured) if configured else default
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _images(batch: dict) -> jnp.ndarray:
    return batch["image"].astype(jnp.float32) / 255.0


def _model_and_variables(config: mlc.ConfigDict):
    model = state_lib.build_model(config, axis_name=None)
    loaded = load_variables(config, config.init.checkpoint)
    return model, loaded


def lab_stats(config: mlc.ConfigDict, workdir: Path, mesh) -> dict:
    dataset = open_split(config, "target", "train")
    stats = np.zeros((len(dataset), 2, 3), np.float32)

    def fn(_, batch):
        mean, std = color.lab_mean_std(batch["image"])
        return {"stats": jnp.stack([mean, std], axis=1)}

    i = 0
    for host, out in _map_dataset(fn, {}, dataset, config, mesh, "Lab statistics"):
        for valid, s in zip(host["valid"], out["stats"]):
            if valid:
                stats[i] = s
                i += 1
    path = _output(config.data.lab_stats, workdir / "lab_stats.npy")
    np.save(path, stats[:i])
    return {"images": i, "path": str(path)}


def true_soft_label(label: np.ndarray, num_classes: int, out_hw: tuple[int, int]) -> np.ndarray:
    """Ground truth as a soft label on the network's output grid, (C, h, w) float32.

    Grid point (i, j) stands for image pixel (i (H-1)/(h-1), j (W-1)/(w-1)), as the
    align-corners resize that moves soft labels onto a crop reads it; each pixel counts for
    its nearest grid point, and a grid point holds the class fractions of its pixels (uniform
    where all are ignore).
    """
    (height, width), (h, w) = label.shape, out_hw
    ys = np.rint(np.arange(height) * (h - 1) / max(height - 1, 1)).astype(np.int64)
    xs = np.rint(np.arange(width) * (w - 1) / max(width - 1, 1)).astype(np.int64)
    cell = ys[:, None] * w + xs[None, :]
    keep = label < num_classes
    counts = np.bincount(label[keep].astype(np.int64) * (h * w) + cell[keep],
                         minlength=num_classes * h * w).reshape(num_classes, h, w).astype(np.float64)
    total = counts.sum(0)
    return np.where(total > 0, counts / np.maximum(total, 1), 1.0 / num_classes).astype(np.float32)


def soft_labels(config: mlc.ConfigDict, workdir: Path, mesh) -> dict:
    store = PseudoLabelStore(config.data.pseudo_labels, create=True)
    dataset = open_split(config, "target", "train")
    if config.data.soft_labels_from_ground_truth:  # the labels' ceiling: no model involved
        from cpsl_jax.models.deeplab import output_size

        n = 0
        for i in tqdm(range(jax.process_index(), len(dataset), jax.process_count()), desc="true soft labels",
                      disable=jax.process_index() != 0):
            item = dataset[i]
            hw = tuple(output_size(int(s)) for s in item["label"].shape)
            store.write_soft(str(item["name"]), true_soft_label(item["label"], config.model.num_classes, hw))
            n += 1
        return {"images": n, "store": str(store.path), "from_ground_truth": True}
    model, loaded = _model_and_variables(config)

    def fn(variables, batch):
        logits = model.apply(variables, _images(batch), train=False)["logits"]
        return {"probs": jnp.moveaxis(jax.nn.softmax(logits, axis=-1), -1, 1).astype(jnp.float16)}

    n = 0
    for host, out in _map_dataset(fn, loaded["variables"], dataset, config, mesh, "soft pseudo labels"):
        for name, valid, probs in zip(host["name"], host["valid"], out["probs"]):
            if valid:
                store.write_soft(str(name), probs)
                n += 1
    return {"images": n, "store": str(store.path)}


def hard_labels(config: mlc.ConfigDict, workdir: Path, mesh) -> dict:
    model, loaded = _model_and_variables(config)
    store = PseudoLabelStore(config.data.pseudo_labels, create=True)
    dataset = open_split(config, "target", "train")

    def fn(variables, batch):
        images = _images(batch)
        logits = model.apply(variables, images, train=False)["logits"]
        flipped = model.apply(variables, images[:, :, ::-1], train=False)["logits"][:, :, ::-1]

        def one(args):
            probs = evaluate.full_res_probabilities(args[0], images.shape[1:3], args[1])
            return jnp.argmax(probs, -1).astype(jnp.uint8), jnp.max(probs, -1).astype(jnp.float16)

        label, conf = jax.lax.map(one, (logits, flipped))
        return {"label": label, "conf": conf}

    n = 0
    for host, out in _map_dataset(fn, loaded["variables"], dataset, config, mesh, "hard pseudo labels"):
        for name, valid, label, conf in zip(host["name"], host["valid"], out["label"], out["conf"]):
            if valid:
                store.write_hard(str(name), label, conf)
                n += 1
    return {"images": n, "store": str(store.path)}


def class_statistics(config: mlc.ConfigDict, workdir: Path, mesh, *, passes: int) -> dict:
    """Initial prototypes and the class distribution from one model pass over the target set.

    The reference's prototype pass updates a running mean image by image; since eval-mode
    outputs do not change between passes, the per-image contributions are computed once and
    replayed ``passes`` times in the same order (identical result, 1/passes of the compute).
    """
    model, loaded = _model_and_variables(config)
    dataset = open_split(config, "target", "train")
    c = config.model.num_classes

    def fn(variables, batch):
        out = model.apply(variables, _images(batch), train=False)
        means, present = cpsl.image_class_means(out["features"], out["logits"],
                                                min_pixels=config.cpsl.prototype_min_pixels)
        counts = jax.nn.one_hot(jnp.argmax(out["logits"], -1), c, dtype=jnp.float32).sum((1, 2))
        return {"means": means, "present": present, "counts": counts}

    means, present, counts = [], [], np.zeros((c,), np.float64)
    for host, out in _map_dataset(fn, loaded["variables"], dataset, config, mesh, "class means"):
        keep = np.asarray(host["valid"], bool)
        means.append(out["means"][keep])
        present.append(out["present"][keep])
        counts += out["counts"][keep].sum(0)
    means, present = np.concatenate(means), np.concatenate(present)
    proto = cpsl.init_prototype_state(c, means.shape[-1])
    update = jax.jit(cpsl.update_prototype_state)
    for _ in range(passes):
        proto = update(proto, jnp.asarray(means), jnp.asarray(present))
    prototypes = np.asarray(proto.means)
    distribution = counts / max(counts.sum(), 1.0)
    proto_path = _output(config.init.prototypes, workdir / "prototypes.npy")
    dist_path = _output(config.init.class_distribution, workdir / "class_distribution.npy")
    np.save(proto_path, prototypes)
    np.save(dist_path, distribution.astype(np.float32))
    return {"images": int(len(means)), "prototypes": str(proto_path), "class_distribution_path": str(dist_path),
            "class_distribution": distribution.round(5).tolist()}


@functools.lru_cache(maxsize=16)
def _batch_statistics_step(model, global_batch: int, mesh):
    """Jitted: each BatchNorm layer's batch mean and unbiased variance over a global batch, and
    whether the batch is full (no padding). One per network and mesh, compiled once."""
    from cpsl_jax.models.norm import BatchNorm

    momentum = BatchNorm.momentum

    def fn(variables, batch):
        zeros = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
        _, new = model.apply({"params": variables["params"], "batch_stats": zeros}, _images(batch), train=True,
                             mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(0)})
        # From zero, one update leaves momentum x (batch mean, unbiased batch variance).
        stats = jax.tree.map(lambda a: a / momentum, new["batch_stats"])
        full = jax.lax.psum(jnp.sum(batch["valid"].astype(jnp.int32)), parallel.AXIS) == global_batch
        return stats, full

    return parallel.sharded_eval(fn, mesh)


def target_statistics(config: mlc.ConfigDict, variables: dict, mesh, dataset=None) -> tuple[dict, int]:
    """BatchNorm running statistics re-estimated on the target training images (AdaBN).

    Every full global batch of ``data.eval_batch_size`` whole target training images passes
    through the network in train mode, BatchNorm synchronised over all devices; each layer's
    batch mean and unbiased variance are averaged over the batches with equal weights (the
    cumulative average of PyTorch's ``momentum=None``). Parameters are unchanged. Measures how
    much of a model's target accuracy comes from its normalisation statistics alone.
    Returns ``(batch_stats, images used)``; the last batch is left out when the split does
    not fill it. ``dataset``: the target training split when the caller has it open already.
    """
    global_batch = config.data.eval_batch_size
    dataset = open_split(config, "target", "train") if dataset is None else dataset
    options = pipeline.LoaderOptions(batch_size=pipeline.host_batch_size(global_batch),
                                     worker_count=config.data.worker_count)
    compiled = _batch_statistics_step(state_lib.build_model(config, axis_name=parallel.AXIS), global_batch, mesh)
    replicated = parallel.replicate(variables, mesh)
    total, count = None, 0
    for host in tqdm(pipeline.val_loader(dataset, options), total=-(-len(dataset) // global_batch),
                     desc="target statistics", disable=jax.process_index() != 0):
        stats, full = compiled(replicated, parallel.shard_batch({k: host[k] for k in ("image", "valid")}, mesh))
        if bool(full):
            stats = jax.tree.map(lambda a: np.asarray(a, np.float64), jax.device_get(stats))
            total = stats if total is None else jax.tree.map(np.add, total, stats)
            count += 1
    if not count:
        raise ValueError(f"target statistics: the target training split has {len(dataset)} images, fewer than one "
                         f"batch of data.eval_batch_size={global_batch}")
    return jax.tree.map(lambda a: (a / count).astype(np.float32), total), count * global_batch


def evaluate_checkpoint(config: mlc.ConfigDict, workdir: Path, mesh) -> dict:
    """mIoU table of ``config.init.checkpoint`` on the target val split, with coloured predictions."""
    model, loaded = _model_and_variables(config)
    dataset = open_split(config, "target", "val")
    if config.eval.target_statistics:
        stats, used = target_statistics(config, loaded["variables"], mesh)
        loaded["variables"] = {**loaded["variables"], "batch_stats": stats}
        log.info("eval: BatchNorm statistics re-estimated on %d target training images", used)
    result = evaluate_variables(config, loaded["variables"], dataset, mesh)
    names = layouts.class_names(config.model.num_classes)
    table = evaluate.format_iou_table(result, names)
    print(table)
    (workdir / "miou.txt").write_text(table + "\n")
    np.save(workdir / "confusion_matrix.npy", result["confusion_matrix"])
    save_predictions(model, loaded["variables"], dataset, config.eval.save_predictions, workdir / "predictions",
                     config.model.num_classes)
    summary = {"stage": "eval", "checkpoint": config.init.checkpoint, "miou": result["miou"],
               "batch_statistics": "target training images" if config.eval.target_statistics else "checkpoint",
               "pixel_accuracy": result["pixel_accuracy"],
               "per_class_iou": dict(zip(names, np.asarray(result["per_class_iou"]).tolist()))}
    if "miou13" in result:
        summary["miou13"] = result["miou13"]
    return summary


def save_predictions(model, variables, dataset, count: int, folder: Path, num_classes: int) -> list[Path]:
    """PNG panels (input | ground truth | prediction) of the first ``count`` images."""
    folder.mkdir(parents=True, exist_ok=True)
    predict = evaluate.full_res_predictor(model)
    paths = []
    for i in range(min(count, len(dataset))):
        item = dataset[i]
        pred = np.asarray(predict(variables, jnp.asarray(item["image"], jnp.float32) / 255.0))
        colors = visualize.palette(num_classes)
        panel = visualize.side_by_side([item["image"], visualize.colorize(item["label"], colors),
                                        visualize.colorize(pred, colors)],
                                       titles=["input", "ground truth", "prediction"])
        paths.append(folder / f"{item['name']}.png")
        visualize.save_png(paths[-1], panel)
    return paths


def run(config: mlc.ConfigDict, workdir: str | Path) -> dict:
    """Run the tool named by ``config.stage``; writes ``summary.json`` into ``workdir``."""
    workdir = Path(workdir)
    setup_logging(workdir)
    mesh = parallel.make_mesh()
    tools = {
        "lab_stats": lab_stats,
        "soft_labels": soft_labels,
        "hard_labels": hard_labels,
        "prototypes": functools.partial(class_statistics, passes=PROTOTYPE_PASSES),
        "class_distribution": functools.partial(class_statistics, passes=PROTOTYPE_PASSES),
        "eval": evaluate_checkpoint,
    }
    if config.stage not in tools:
        raise ValueError(f"no tool for stage {config.stage!r}")
    summary = {"stage": config.stage, **tools[config.stage](config, workdir, mesh)}
    writer = MetricWriter(workdir)
    writer.summary(**summary)
    writer.close()
    log.info("%s: %s", config.stage, json.dumps({k: v for k, v in summary.items() if k != "per_class_iou"}))
    return summary
