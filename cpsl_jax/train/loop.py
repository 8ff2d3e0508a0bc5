"""The host side of training: data in, compiled step, logging, evaluation, checkpoints.

``train(config, workdir)`` runs one training stage (warm-up, stage 1, 2 or 3) as its config
describes; ``evaluate_model(config, workdir)`` evaluates a checkpoint. Only metrics at log
steps and confusion matrices leave the devices.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import ml_collections as mlc
import numpy as np
from flax import serialization

from cpsl_jax import evaluate, models
from cpsl_jax.data import layouts, pipeline
from cpsl_jax.data.pseudo_labels import PseudoLabelStore
from cpsl_jax.train import guards, parallel, steps
from cpsl_jax.train import state as state_lib
from cpsl_jax.train.checkpoint import Checkpointer, abstract_like, quarantine
from cpsl_jax.train.io import init_discriminator, load_variables, open_split, save_model
from cpsl_jax.train.logger import MetricWriter, Progress, setup_logging

log = logging.getLogger(__name__)
HOST_ONLY_KEYS = ("name", "target_lab_index")


def device_batch(host_batch: dict) -> dict:
    """Drop what stays on the host (names) from a grain batch."""
    return {k: v for k, v in host_batch.items() if k not in HOST_ONLY_KEYS}


def _loader_options(config: mlc.ConfigDict, *, seed_offset: int, eval_: bool = False) -> pipeline.LoaderOptions:
    batch = config.data.eval_batch_size if eval_ else config.data.batch_size
    return pipeline.LoaderOptions(batch_size=pipeline.host_batch_size(batch), seed=config.seed + seed_offset,
                                  worker_count=config.data.worker_count)


def _train_loaders(config: mlc.ConfigDict) -> dict[str, Any]:
    """The source and target training loaders a stage needs."""
    stage = config.stage
    source = open_split(config, "source", "train")
    lab = np.load(config.data.lab_stats) if config.data.lab_stats else None
    loaders = {"source": pipeline.source_train_loader(source, _loader_options(config, seed_offset=1), lab)}
    if steps.source_only(config):  # nothing of the target enters the step: read none of it
        return loaders
    target = open_split(config, "target", "train")
    store, kind = None, "soft"
    if stage in ("stage1", "stage2", "stage3", "self_training"):
        store = PseudoLabelStore(config.data.pseudo_labels)
        kind = "soft" if stage == "stage1" else "hard"
    loaders["target"] = pipeline.target_train_loader(target, _loader_options(config, seed_offset=2), store, kind,
                                                     config.data.confidence_threshold)
    return loaders


def _teacher_bn(config: mlc.ConfigDict) -> bool:
    """Whether the distillation teacher has ``bn_pretrain``: the stage-2 teacher is the stage-1
    model (without it), the stage-3 teacher the stage-2 model (like the student)."""
    return config.stage == "stage3" and config.model.bn_pretrain


def _initial_state(config: mlc.ConfigDict, mesh, tx, disc_tx):
    """Build the stage's first state from the checkpoints named in ``config.init``."""
    rng = jax.random.PRNGKey(config.seed)
    loaded = load_variables(config, config.init.checkpoint, backbone_only=config.init.backbone_only)
    kw: dict[str, Any] = {}
    if config.stage == "stage1":
        teacher = load_variables(config, config.init.teacher or config.init.checkpoint)
        kw["teacher"] = teacher["variables"]
        kw["prototypes"] = np.load(config.init.prototypes) if config.init.prototypes else loaded["prototypes"]
        kw["class_prior"] = np.load(config.init.class_distribution)
    elif config.stage in ("stage2", "stage3"):
        kw["teacher"] = load_variables(config, config.init.teacher, bn_pretrain=_teacher_bn(config))["variables"]
    elif config.stage == "warmup":
        disc = loaded["discriminator"] or init_discriminator(config, rng)
        kw.update(discriminator=disc, disc_tx=disc_tx)
    state = state_lib.create_state(config, loaded["variables"], tx, rng=rng, **kw)
    return parallel.replicate(state, mesh)


def _compiled_step(config: mlc.ConfigDict, mesh, tx, disc_tx):
    model = state_lib.build_model(config, axis_name=parallel.AXIS)
    stage = config.stage
    if stage == "warmup":
        fn = functools.partial(steps.warmup_step, model=model, discriminator=models.Discriminator(),
                               tx=tx, disc_tx=disc_tx, config=config)
    elif stage == "stage1":
        fn = functools.partial(steps.stage1_step, model=model, tx=tx, config=config)
    elif stage == "self_training":
        fn = functools.partial(steps.self_training_step, model=model, tx=tx, config=config)
    else:
        teacher_model = state_lib.build_model(config, axis_name=None, bn_pretrain=_teacher_bn(config))
        fn = functools.partial(steps.distill_step, model=model, teacher_model=teacher_model, tx=tx, config=config)
    return parallel.data_parallel(guards.skip_nonfinite(fn), mesh, backend=config.train.parallel)


def _next_batch(iterators: dict[str, Iterator], mesh) -> dict:
    return {name: parallel.shard_batch(device_batch(next(it)), mesh) for name, it in iterators.items()}


def train(config: mlc.ConfigDict, workdir: str | Path) -> dict:
    """Run the training stage ``config.stage``; returns the final summary."""
    workdir = Path(workdir)
    setup_logging(workdir)
    writer = MetricWriter(workdir)
    mesh = parallel.make_mesh()
    tx = state_lib.make_optimizer(config)
    disc_tx = state_lib.make_discriminator_optimizer(config) if config.stage == "warmup" else None
    loaders = _train_loaders(config)
    iterators = {name: iter(loader) for name, loader in loaders.items()}
    val = open_split(config, "target", "val") if config.train.eval_every > 0 else None

    state = _initial_state(config, mesh, tx, disc_tx)
    ckpt = Checkpointer(workdir / "checkpoints", keep=config.train.keep_checkpoints,
                        save_every=config.train.checkpoint_every)
    restored = ckpt.restore(abstract_like(state), iterators=iterators)
    if restored is not None:
        state, start = restored
        log.info("resumed from step %d in %s", start, ckpt.directory)
    start = int(jax.device_get(state.step))
    step_fn = _compiled_step(config, mesh, tx, disc_tx)
    total = min(config.train.steps, config.optim.max_steps)
    progress = Progress(total, initial=start, desc=config.stage, images_per_step=config.data.batch_size)
    best = _resumed_best(config, ckpt, state, workdir) if restored is not None else {"miou": -1.0}
    summary: dict[str, Any] = {"stage": config.stage}
    t_compile = time.perf_counter()
    try:
        for step in range(start, total):
            batch = _next_batch(iterators, mesh)
            state, metrics = step_fn(state, batch)
            if step == start:
                log.info("first step (compilation included) took %.1f s", time.perf_counter() - t_compile)
            done = step + 1
            if done % config.train.log_every == 0 or done == total:
                _log_metrics(config, metrics, done, writer, progress)
            progress.update(1)
            if val is not None and (done % config.train.eval_every == 0 or done == total):
                best = _validate(config, state, val, mesh, done, best, writer, ckpt, workdir)
            stop = ckpt.should_stop(done)  # asked once per step: it may synchronise the hosts
            ckpt.save(done, state, iterators=iterators, config=config, force=done == total or stop)
            if stop:
                log.warning("stopping at step %d on request; resume with the same command", done)
                break
    finally:  # also when a guard stops the run: finish the checkpoint writes in flight
        progress.close()
        ckpt.wait()
    save_model(workdir / "model.msgpack", state, config)
    summary.update(step=int(jax.device_get(state.step)), images_per_second=progress.images_per_second(),
                   best_miou=best.get("miou"), best_step=best.get("step"),
                   per_class_iou=best.get("per_class_iou"))
    writer.summary(**summary)
    writer.close()
    ckpt.close()
    return summary


def _move_unreadable(path: Path, err: Exception) -> None:
    """Move an unreadable record aside (``quarantine``) with one warning line naming the error."""
    why = " ".join(str(err).split())[:200]
    log.warning("%s could not be read (%s: %s); moved to %s", path.name, type(err).__name__, why, quarantine(path).name)


def _resumed_best(config: mlc.ConfigDict, ckpt: Checkpointer, state, workdir: Path) -> dict:
    """The best validation so far, as a resumed run goes on comparing with it.

    Its three records are checked, and one that cannot be read is moved aside
    (``<name>.corrupt-<time>``) with a warning: ``best.json`` (the mIoU to beat),
    ``checkpoints/best/<step>`` (restored like the rolling steps) and ``best_model.msgpack``,
    which is written again from the best checkpoint when it is unreadable or missing. With
    neither a best checkpoint nor a best model left, the next validation becomes the best.
    """
    best_file, model_file = workdir / "best.json", workdir / "best_model.msgpack"
    best = None
    if best_file.exists():
        try:
            best = json.loads(best_file.read_text())
            best["miou"] = float(best["miou"])
        except (ValueError, KeyError, TypeError) as err:
            _move_unreadable(best_file, err)
            best = None
    restored = ckpt.restore_best(abstract_like(state))
    model_ok = False
    if model_file.exists():
        try:
            serialization.msgpack_restore(model_file.read_bytes())
            model_ok = True
        except Exception as err:  # noqa: BLE001 - whatever msgpack says, the file is not a model
            _move_unreadable(model_file, err)
    if restored is not None:
        best_state, best_step = restored
        if not model_ok:
            save_model(model_file, best_state, config)
            model_ok = True
            log.warning("%s written again from the best checkpoint (step %d)", model_file.name, best_step)
        if best is None:
            best = {"miou": float(ckpt.best_miou()), "step": best_step}
    if best is not None and not model_ok:
        log.warning("the best model (step %s, mIoU %.4f) is lost; the next validation becomes the best",
                    best.get("step"), best["miou"])
        best = None
    return best or {"miou": -1.0}


def _log_metrics(config, metrics, step: int, writer, progress) -> None:
    """The only per-step host transfer: metrics at log steps (and the non-finite guard's verdict)."""
    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
    guards.check(host, config.train.nonfinite_skip, step)
    writer.scalars(step, host, prefix="train/")
    progress.update(0, **{k: host[k] for k in ("loss",) if k in host})


def _validate(config, state, val, mesh, step: int, best: dict, writer, ckpt, workdir: Path) -> dict:
    """Evaluate the student on the target val split; keep it as the best model if it is."""
    result = evaluate_variables(config, _student_variables(state), val, mesh)
    writer.scalars(step, {"miou": result["miou"], "pixel_accuracy": result["pixel_accuracy"]}, prefix="val/")
    log.info("step %d: target mIoU %.2f", step, 100 * result["miou"])
    if result["miou"] <= best["miou"]:
        return best
    names = layouts.class_names(config.model.num_classes)
    ckpt.save_best(step, state, result["miou"], config=config)
    save_model(workdir / "best_model.msgpack", state, config)
    best = {"miou": float(result["miou"]), "step": step,
            "per_class_iou": dict(zip(names, np.asarray(result["per_class_iou"], float).tolist()))}
    if jax.process_index() == 0:
        (workdir / "best.json").write_text(json.dumps(best, indent=1) + "\n")
    return best


def _student_variables(state: state_lib.TrainState) -> dict:
    return {"params": state.params["model"], "batch_stats": state.batch_stats}


@functools.lru_cache(maxsize=16)
def _compiled_eval_step(model, num_classes: int, flip: bool, mesh):
    """The jitted evaluation step, one per network and mesh, so that evaluating several
    checkpoints of one network (the demo's stages) compiles it once."""
    return parallel.sharded_eval(functools.partial(steps.eval_step, model=model, num_classes=num_classes, flip=flip,
                                                   axis_name=parallel.AXIS), mesh)


def evaluate_variables(config: mlc.ConfigDict, variables: dict, dataset, mesh, *,
                       bn_pretrain: bool | None = None) -> dict:
    """mIoU, per-class IoU and pixel accuracy of ``variables`` on ``dataset`` (every image once)."""
    model = state_lib.build_model(config, axis_name=None, bn_pretrain=bn_pretrain)
    options = _loader_options(config, seed_offset=0, eval_=True)
    loader = pipeline.val_loader(dataset, options)
    step = _compiled_eval_step(model, config.model.num_classes, config.eval.flip, mesh)
    variables = parallel.replicate(variables, mesh)
    cm = np.zeros((config.model.num_classes,) * 2, np.int64)
    n_batches = math.ceil(len(dataset) / config.data.eval_batch_size)
    for i, host in enumerate(loader):
        if config.eval.max_images and i * config.data.eval_batch_size >= config.eval.max_images:
            break
        batch = parallel.shard_batch({k: host[k] for k in ("image", "label", "valid")}, mesh)
        cm += np.asarray(jax.device_get(step(variables, batch)), np.int64)
        log.debug("eval batch %d/%d", i + 1, n_batches)
    # eval_step psums over the global mesh: cm already counts every host's images.
    subsets = {"miou13": evaluate.SYNTHIA_13_OF_16} if config.model.num_classes == 16 else None
    result = evaluate.iou_from_confusion(cm, subsets)
    result["confusion_matrix"] = cm
    return result
