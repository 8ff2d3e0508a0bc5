"""One pure step function per stage, written as per-device code over the mesh axis ``'data'``.

Every step is ``step(state, batch, *, model, config, ...) -> (state, metrics)``: ``batch`` is
this device's slice of the global batch (uint8 images at base size, labels, pseudo labels);
augmentation runs here, on the device. Collectives: synchronised BatchNorm inside the
model, loss normalisers (each loss is a *share* whose psum is the global loss), gathered
rows for the self-labeling scan, and the psum of gradients. ``cpsl_jax.train.parallel``
compiles a step with ``jax.shard_map`` (or ``jax.pmap``); nothing here touches the host.

Randomness: ``key = fold_in(state.rng, state.step)`` is equal on every device. What the
global batch shares (CutMix coin and box, the self-labeling positions) is drawn from it
once; per-image draws (crops, flips, strong views, anchors) are drawn for the whole
global batch from it and each device keeps its own rows, so a run gives the same images
on 1 or on 8 devices. Only dropout masks depend on the device layout.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections as mlc
import optax
from jax import lax

from cpsl_jax import cpsl, ops
from cpsl_jax.data import augment
from cpsl_jax.train.state import TrainState

AXIS = "data"
Batch = dict[str, Any]


# -- shared pieces ------------------------------------------------------------------------------

def _keys(state: TrainState, axis_name: str | None) -> tuple[jax.Array, jax.Array]:
    """(key shared by all devices, this device's key for dropout) of the current step."""
    shared = jax.random.fold_in(state.rng, state.step)
    local = shared if axis_name is None else jax.random.fold_in(shared, lax.axis_index(axis_name))
    return shared, jax.random.fold_in(local, 1)


def _global_batch(b: int, axis_name: str | None) -> int:
    return b if axis_name is None else b * lax.axis_size(axis_name)


def _global_index(b: int, axis_name: str | None) -> jnp.ndarray:
    """Indices of this device's images in the global batch."""
    start = 0 if axis_name is None else lax.axis_index(axis_name) * b
    return start + jnp.arange(b)


def _own(tree, b: int, axis_name: str | None):
    """This device's rows of per-image parameters drawn for the whole global batch."""
    if axis_name is None:
        return tree
    start = lax.axis_index(axis_name) * b
    return jax.tree.map(lambda x: lax.dynamic_slice_in_dim(x, start, b, axis=0), tree)


def _strong_view(key: jax.Array, weak_img: jnp.ndarray, config, axis_name: str | None):
    """The strong view of each weak crop, drawn as ``config.data.strong`` says: (params, images)."""
    s = config.data.strong
    params = _draw(augment.sample_strong, key, weak_img.shape[0], axis_name, crop_hw=_crop_hw(config),
                   n_ops=s.ops, max_magnitude=s.max_magnitude, op_prob=s.op_prob, blur_prob=s.blur_prob,
                   jitter=s.jitter, hue=s.hue, jitter_prob=s.jitter_prob, cutout=s.cutout)
    return params, _per_image(augment.strong_view, weak_img, params)


def _draw(sample, key: jax.Array, b: int, axis_name: str | None, **kw):
    """Per-image augmentation parameters, independent of how the batch is split over devices."""
    return _own(sample(key, _global_batch(b, axis_name), **kw), b, axis_name)


def _apply(model, params, batch_stats, images, *, train: bool, key: jax.Array | None = None):
    """Forward pass; in train mode returns the updated batch statistics too."""
    variables = {"params": params, "batch_stats": batch_stats}
    if not train:
        return model.apply(variables, images, train=False), batch_stats
    out, mutated = model.apply(variables, images, train=True, mutable=["batch_stats"], rngs={"dropout": key})
    return out, mutated["batch_stats"]


class _StudentPasses:
    """Training-mode forwards of the student on each view, one after the other.

    ``views`` is a list of same-shape image batches and ``keys`` their dropout keys; ``next()``
    gives the next view's output and ``stats`` the batch statistics after the passes so far.
    Each pass normalises with its own batch statistics and updates the running ones in turn.
    Without ``scan`` each ``next()`` is a separate call, placed where the step asks for it. With
    ``scan`` all passes run at the first ``next()`` as one ``lax.scan`` over the stacked views:
    the network is compiled once instead of once per view, which shortens compilation, but XLA
    then keeps every pass's activations in stacked loop buffers and schedules the loop as a
    unit, which on a GPU costs time and memory (``train.scan_passes`` in
    ``cpsl_jax/defaults.py``). The warm-up has 2 passes, stage 1 has 3 and stages 2/3 have 2.
    """

    def __init__(self, model, params, batch_stats, views, keys, *, scan: bool, update_stats=None):
        self._model, self._params, self._views, self._keys, self._scan = model, params, views, keys, scan
        # Which passes move the running statistics (all by default); the others leave them as
        # they found them, still normalising with their own batch statistics.
        self._update = tuple(update_stats) if update_stats is not None else (True,) * len(views)
        self.stats, self._done, self._outs = batch_stats, 0, None

    def next(self) -> dict:
        i = self._done
        self._done += 1
        if not self._scan:
            out, stats = _apply(self._model, self._params, self.stats, self._views[i], train=True, key=self._keys[i])
            self.stats = stats if self._update[i] else self.stats
            return out
        if self._outs is None:
            def body(stats, xs):
                view, key, update = xs
                out, new = _apply(self._model, self._params, stats, view, train=True, key=key)
                return jax.tree.map(lambda a, b: jnp.where(update, a, b), new, stats), out

            xs = (jnp.stack(self._views), jnp.stack(self._keys), jnp.asarray(self._update))
            self.stats, self._outs = lax.scan(body, self.stats, xs)
        return jax.tree.map(lambda a: a[i], self._outs)


def _psum(tree, axis_name):
    return tree if axis_name is None else lax.psum(tree, axis_name)


def _apply_gradients(state: TrainState, grads, tx: optax.GradientTransformation, axis_name):
    grads = _psum(grads, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return params, opt_state, optax.tree.norm(grads)


def _student_update(state: TrainState, loss_fn, tx: optax.GradientTransformation, axis_name):
    """One optimiser step of a student whose ``loss_fn(params) -> (loss, (batch_stats, parts))``:
    the new state (step, params, running statistics, optimiser) and the summed metrics."""
    (loss, (stats, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    params, opt_state, gnorm = _apply_gradients(state, grads, tx, axis_name)
    new = state.replace(step=state.step + 1, params=params, batch_stats=stats, opt_state=opt_state)
    metrics = _psum({"loss": loss, **parts}, axis_name)
    metrics["grad_norm"] = gnorm
    return new, metrics


def _crop_hw(config: mlc.ConfigDict) -> tuple[int, int]:
    w, h = config.data.crop_size
    return int(h), int(w)


def _quarter(hw: tuple[int, int]) -> tuple[int, int]:
    return hw[0] // 4, hw[1] // 4


def _segmentation_loss(logits, labels, config: mlc.ConfigDict, *, rce: bool, axis_name):
    """CE (or 0.1 CE + 1.0 RCE) of logits against labels at the labels' resolution."""
    logits = ops.resize_bilinear(logits, labels.shape[1:3])
    if rce:
        return cpsl.symmetric_cross_entropy(logits, labels, alpha=config.cpsl.rce_alpha, beta=config.cpsl.rce_beta,
                                            axis_name=axis_name)
    return cpsl.cross_entropy(logits, labels, axis_name=axis_name)


def _per_image(fn, images: jnp.ndarray, *args):
    """``fn(images, *args)`` evaluated image by image (``lax.map``).

    The views round to 8-bit levels as Pillow does; evaluated per image, the same code runs
    for every image however the batch is split over devices, so a pixel cannot land on the
    other side of a rounding boundary on 4 devices than on 1.
    """
    one = lambda xs: fn(xs[0][None], *jax.tree.map(lambda a: a[None], xs[1:]))[0]  # noqa: E731
    return lax.map(one, (images, *args))


def _weak_params(key: jax.Array, images: jnp.ndarray, config: mlc.ConfigDict, axis_name):
    """The weak view's rescale/crop/flip of this device's images, drawn for the global batch."""
    return _draw(augment.sample_weak, key, images.shape[0], axis_name, base_hw=images.shape[1:3],
                 crop_hw=_crop_hw(config), base_width=config.data.rescale_base_width,
                 scale=tuple(config.data.rescale_range))


def source_view(batch: Batch, key: jax.Array, config: mlc.ConfigDict, axis_name: str | None):
    """The source crop: colour transfer toward a target image (GTA5 runs), then the weak view.

    Returns ``(images (b, H, W, 3) float [0, 1], labels (b, H, W) uint8)`` at the crop size.
    """
    images = batch["image"]
    if config.data.colour_transfer:
        images = _per_image(augment.lab_transfer, images, batch["target_lab"][:, 0], batch["target_lab"][:, 1])
    params = _weak_params(key, images, config, axis_name)
    crop = _per_image(augment.weak_view, images, params)
    labels = augment.move_to_weak(batch["label"][..., None], params, _crop_hw(config), method="nearest")[..., 0]
    return crop, labels


# -- warm-up ------------------------------------------------------------------------------------

def source_only(config: mlc.ConfigDict) -> bool:
    """A warm-up with ``adv.weight == 0``: source labels alone, no target batch needed."""
    return config.stage == "warmup" and config.adv.weight == 0


def warmup_step(state: TrainState, batch: Batch, *, model, discriminator, tx, disc_tx, config,
                axis_name: str | None = AXIS):
    """Adversarial warm-up: source CE + 0.01 x LSGAN (target outputs toward the source label 0);
    the discriminator (Adam) learns source -> 0, target -> 1 on the crops' softmax. With
    ``adv.weight == 0`` (:func:`source_only`) the batch needs no ``target`` entry."""
    shared, local = _keys(state, axis_name)
    k_src, k_tgt = jax.random.split(shared)
    k_drop1, k_drop2 = jax.random.split(local)
    src_img, src_lbl = source_view(batch["source"], k_src, config, axis_name)
    if source_only(config):
        return _source_only_update(state, src_img, src_lbl, k_drop1, model=model, tx=tx, config=config,
                                   axis_name=axis_name)
    tgt_img = _per_image(augment.weak_view, batch["target"]["image"],
                         _weak_params(k_tgt, batch["target"]["image"], config, axis_name))
    crop_hw = _crop_hw(config)
    n_local = jnp.float32(src_img.shape[0])
    n_global = _psum(n_local, axis_name)

    def disc_mse(d_params, probs, label):
        out = discriminator.apply({"params": d_params}, probs)
        # MSE over all outputs of the global batch: local sum / global element count.
        return jnp.sum(jnp.square(out - label)) / (out[0].size * n_global)

    def loss_fn(params):
        passes = _StudentPasses(model, params["model"], state.batch_stats, [src_img, tgt_img], [k_drop1, k_drop2],
                                scan=config.train.scan_passes)
        out = passes.next()
        seg = _segmentation_loss(out["logits"], src_lbl, config, rce=False, axis_name=axis_name)
        out_t = passes.next()
        stats = passes.stats
        tgt_probs = jax.nn.softmax(ops.resize_bilinear(out_t["logits"], crop_hw), axis=-1)
        adv = disc_mse(state.disc_params, tgt_probs, 0.0)
        src_probs = jax.nn.softmax(ops.resize_bilinear(out["logits"], crop_hw), axis=-1)
        total = seg + config.adv.weight * adv
        return total, (stats, lax.stop_gradient(src_probs), lax.stop_gradient(tgt_probs), seg, adv)

    (loss, (stats, src_probs, tgt_probs, seg, adv)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    params, opt_state, gnorm = _apply_gradients(state, grads, tx, axis_name)

    def d_loss_fn(d_params):
        return disc_mse(d_params, src_probs, 0.0) + disc_mse(d_params, tgt_probs, 1.0)

    d_loss, d_grads = jax.value_and_grad(d_loss_fn)(state.disc_params)
    d_grads = _psum(d_grads, axis_name)
    d_updates, disc_opt_state = disc_tx.update(d_grads, state.disc_opt_state, state.disc_params)
    new = state.replace(step=state.step + 1, params=params, batch_stats=stats, opt_state=opt_state,
                        disc_params=optax.apply_updates(state.disc_params, d_updates), disc_opt_state=disc_opt_state)
    metrics = _psum({"loss": loss, "source_ce": seg, "adv": adv, "disc": d_loss}, axis_name)
    metrics["grad_norm"] = gnorm
    return new, metrics


def _source_only_update(state: TrainState, src_img, src_lbl, key, *, model, tx, config, axis_name):
    """The warm-up step of :func:`source_only`: source cross-entropy alone. Nothing of the target
    enters the update, so the target pass and the discriminator are skipped (it keeps its
    parameters) and the running batch statistics are the source's only."""

    def loss_fn(params):
        out, stats = _apply(model, params["model"], state.batch_stats, src_img, train=True, key=key)
        return _segmentation_loss(out["logits"], src_lbl, config, rce=False, axis_name=axis_name), stats

    (seg, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    params, opt_state, gnorm = _apply_gradients(state, grads, tx, axis_name)
    new = state.replace(step=state.step + 1, params=params, batch_stats=stats, opt_state=opt_state)
    zero = jnp.zeros((), jnp.float32)
    metrics = _psum({"loss": seg, "source_ce": seg, "adv": zero, "disc": zero}, axis_name)
    metrics["grad_norm"] = gnorm
    return new, metrics


# -- stage 1: CPSL self-labeling ----------------------------------------------------------------

def stage1_step(state: TrainState, batch: Batch, *, model, tx, config, axis_name: str | None = AXIS):
    """One CPSL iteration (cpsl-method.md, "Stage 1", steps 1-12)."""
    c = config.cpsl
    shared, local = _keys(state, axis_name)
    k_src, k_weak, k_strong, k_cut, k_pos, k_anchor = jax.random.split(shared, 6)
    k_d1, k_d2, k_d3, k_dt = jax.random.split(local, 4)
    crop_hw = _crop_hw(config)
    quarter = _quarter(crop_hw)
    tgt = batch["target"]
    b = tgt["image"].shape[0]
    image_ids = _global_index(b, axis_name)

    # 1. Source crop.
    src_img, src_lbl = source_view(batch["source"], k_src, config, axis_name)

    # 2-3. Target views: weak crop (+ CutMix), strong view of the crop; the teacher sees the whole image.
    weak = _weak_params(k_weak, tgt["image"], config, axis_name)
    weak_img = _per_image(augment.weak_view, tgt["image"], weak)
    strong, strong_img = _strong_view(k_strong, weak_img, config, axis_name)
    apply_cutmix, box = cpsl.sample_cutmix(k_cut, crop_hw, prob=c.cutmix_prob)
    mixed_img = cpsl.mix_images(weak_img, src_img, box, apply_cutmix)

    teacher_images = tgt["image"].astype(jnp.float32) / 255.0
    t_out, _ = _apply(model, state.teacher["params"], state.teacher["batch_stats"], teacher_images,
                      train=c.teacher_train_mode, key=k_dt)
    t_logits, t_feats = lax.stop_gradient(t_out["logits"]), lax.stop_gradient(t_out["features"])
    t_hw = t_feats.shape[1:3]

    # 5. Prototype rectification of the soft pseudo labels on the weak crop (128x224).
    base_hw = tgt["image"].shape[1:3]
    t_feats_quarter = ops.resize_bilinear(t_feats, _quarter(base_hw))  # 256x512 for a 1024x2048 image
    t_feats_quarter = augment.full2weak(t_feats_quarter, weak)
    soft = augment.soft_label_to_weak(jnp.moveaxis(tgt["soft_label"].astype(jnp.float32), 1, -1), weak, quarter)
    if c.rectify:
        label_sl = cpsl.rectify_pseudo_labels(t_feats_quarter, soft, state.prototypes_ema,
                                              temperature=c.temperature, threshold=c.rectify_threshold)
    else:
        label_sl = jnp.argmax(soft, axis=-1).astype(jnp.int32)
    label_sl_teacher = ops.resize_nearest(label_sl, t_hw)  # threshold_SL on the teacher's grid
    target_lbl = cpsl.mix_labels(label_sl, src_lbl, box, apply_cutmix)

    # 7. Self-labeling rows: one permutation shared by the batch.
    positions = cpsl.sample_positions(k_pos, t_hw[0] * t_hw[1], c.samples_per_image)
    sl_feats = cpsl.gather_positions(t_feats, positions)
    sl_logits = cpsl.gather_positions(t_logits, positions)
    push_labels = cpsl.queue_push_labels(label_sl_teacher, positions, quirk=c.queue_label_quirk)

    # 10. Teacher's prototype scores moved onto the strong view.
    t_scores = cpsl.cosine_scores(t_feats_quarter, state.prototypes_ema)
    t_scores_strong, strong_valid = augment.move_to_strong(t_scores, strong, translate_quirk=c.translate_quirk)

    def loss_fn(params):
        passes = _StudentPasses(model, params["model"], state.batch_stats, [src_img, mixed_img, strong_img],
                                [k_d1, k_d2, k_d3], scan=config.train.scan_passes,
                                update_stats=(not c.target_running_stats, True, not c.target_running_stats))
        out_s = passes.next()
        source_ce = _segmentation_loss(out_s["logits"], src_lbl, config, rce=False, axis_name=axis_name)
        out_w = passes.next()
        target_ce = _segmentation_loss(out_w["logits"], target_lbl, config, rce=c.rce, axis_name=axis_name)
        sl, fq, oq = cpsl.self_labeling_loss(
            sl_feats, sl_logits, params["prototypes"], state.feature_queue, state.output_queue, push_labels,
            state.class_prior, temperature=c.temperature, epsilon=c.epsilon, iterations=c.sinkhorn_iterations,
            batched=c.batched_sinkhorn, axis_name=axis_name)
        # 9. Contrastive term: iterations without CutMix, once the feature queue is in use.
        anchors, idx = cpsl.sample_anchors(k_anchor, out_w["features"], c.samples_per_image, image_ids)
        a_map = label_sl_teacher if c.anchor_label_quirk else ops.resize_nearest(label_sl, out_w["features"].shape[1:3])
        a_labels = cpsl.anchor_labels(a_map, idx, out_w["features"].shape[1:3], quirk=c.anchor_label_quirk)
        contrast = cpsl.contrastive_share(anchors, a_labels, fq.rows, fq.labels, c.temperature, axis_name)
        contrast = jnp.where(fq.was_in_use & ~apply_cutmix, contrast, 0.0)
        out_st = passes.next()
        stats = passes.stats
        s_scores = cpsl.cosine_scores(ops.resize_bilinear(out_st["features"], quarter), state.prototypes_ema)
        consistency = cpsl.prototype_consistency(t_scores_strong, s_scores, strong_valid[..., None],
                                                 c.temperature, axis_name)
        total = (source_ce + target_ce + c.sl_weight * sl + c.contrastive_weight * contrast
                 + c.consistency_weight * consistency)
        parts = dict(source_ce=source_ce, target_ce=target_ce, self_labeling=sl, contrastive=contrast,
                     consistency=consistency)
        return total, (stats, fq, oq, parts)

    (loss, (stats, fq, oq, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    params, opt_state, gnorm = _apply_gradients(state, grads, tx, axis_name)

    # 12. EMA teacher (its buffers are the student's) and EMA prototypes.
    decay = c.teacher_ema
    teacher = {"params": jax.tree.map(lambda t, s: decay * t + (1 - decay) * s, state.teacher["params"], params["model"]),
               "batch_stats": stats}
    new = state.replace(step=state.step + 1, params=params, batch_stats=stats, opt_state=opt_state, teacher=teacher,
                        prototypes_ema=cpsl.ema_prototypes(state.prototypes_ema, params["prototypes"], c.prototype_ema),
                        feature_queue=fq, output_queue=oq)
    metrics = _psum({"loss": loss, **parts}, axis_name)
    metrics.update(grad_norm=gnorm, cutmix=apply_cutmix.astype(jnp.float32),
                   queue_in_use=fq.was_in_use.astype(jnp.float32))
    return new, metrics


# -- stages 2 and 3: distillation ---------------------------------------------------------------

def distill_step(state: TrainState, batch: Batch, *, model, teacher_model, tx, config, axis_name: str | None = AXIS):
    """Distillation into a fresh student (cpsl-method.md, "Stage 2 and 3")."""
    shared, local = _keys(state, axis_name)
    k_src, k_weak, k_strong = jax.random.split(shared, 3)
    k_d1, k_d2 = jax.random.split(local)
    crop_hw = _crop_hw(config)
    quarter = _quarter(crop_hw)
    tgt = batch["target"]
    src_img, src_lbl = source_view(batch["source"], k_src, config, axis_name)
    weak = _weak_params(k_weak, tgt["image"], config, axis_name)
    weak_img = _per_image(augment.weak_view, tgt["image"], weak)
    strong, strong_img = _strong_view(k_strong, weak_img, config, axis_name)
    # Hard pseudo label: onto the crop at full crop resolution, x0.25 nearest, onto the strong view.
    label = augment.move_to_weak(tgt["pseudo_label"][..., None], weak, crop_hw, method="nearest")
    label = ops.resize_nearest(label, quarter)
    label, valid = augment.move_to_strong(label.astype(jnp.int32), strong, translate_quirk=config.cpsl.translate_quirk)
    label = jnp.where(valid, label[..., 0], cpsl.IGNORE_INDEX)

    t_out, _ = _apply(teacher_model, state.teacher["params"], state.teacher["batch_stats"], strong_img, train=False)
    t_logits = lax.stop_gradient(ops.resize_bilinear(t_out["logits"], quarter))

    def loss_fn(params):
        passes = _StudentPasses(model, params["model"], state.batch_stats, [src_img, strong_img], [k_d1, k_d2],
                                scan=config.train.scan_passes,
                                update_stats=(not config.kd.target_running_stats, True))
        out_s = passes.next()
        source_ce = _segmentation_loss(out_s["logits"], src_lbl, config, rce=False, axis_name=axis_name)
        out_t = passes.next()
        stats = passes.stats
        s_logits = ops.resize_bilinear(out_t["logits"], quarter)
        target_ce = _segmentation_loss(s_logits, label, config, rce=config.kd.rce, axis_name=axis_name)
        kd = cpsl.distillation_kl(s_logits, t_logits, quirk=config.kd.quirk, axis_name=axis_name)
        total = source_ce + target_ce + config.kd.weight * kd
        return total, (stats, dict(source_ce=source_ce, target_ce=target_ce, kd=kd))

    return _student_update(state, loss_fn, tx, axis_name)


# -- the self-training baseline ------------------------------------------------------------------

def self_training_step(state: TrainState, batch: Batch, *, model, tx, config, axis_name: str | None = AXIS):
    """Plain hard-label self-training, the baseline CPSL improves on.

    Source cross-entropy plus cross-entropy on the target crop (the weak view) against the
    warm-up's argmax pseudo labels, with the pixels at or below ``data.confidence_threshold``
    ignored (applied when the store is read). No prototypes, no Sinkhorn, no class prior, no
    teacher, no strong view. ``self_training.target_running_stats``: only the target pass moves
    the running BatchNorm statistics, as ``cpsl.target_running_stats`` in stage 1.
    """
    shared, local = _keys(state, axis_name)
    k_src, k_weak = jax.random.split(shared)
    k_d1, k_d2 = jax.random.split(local)
    crop_hw = _crop_hw(config)
    tgt = batch["target"]
    src_img, src_lbl = source_view(batch["source"], k_src, config, axis_name)
    weak = _weak_params(k_weak, tgt["image"], config, axis_name)
    tgt_img = _per_image(augment.weak_view, tgt["image"], weak)
    tgt_lbl = augment.move_to_weak(tgt["pseudo_label"][..., None], weak, crop_hw, method="nearest")[..., 0]

    def loss_fn(params):
        passes = _StudentPasses(model, params["model"], state.batch_stats, [src_img, tgt_img], [k_d1, k_d2],
                                scan=config.train.scan_passes,
                                update_stats=(not config.self_training.target_running_stats, True))
        source_ce = _segmentation_loss(passes.next()["logits"], src_lbl, config, rce=False, axis_name=axis_name)
        target_ce = _segmentation_loss(passes.next()["logits"], tgt_lbl, config, rce=False, axis_name=axis_name)
        return source_ce + target_ce, (passes.stats, dict(source_ce=source_ce, target_ce=target_ce))

    return _student_update(state, loss_fn, tx, axis_name)


# -- evaluation ---------------------------------------------------------------------------------

def eval_step(variables: dict, batch: Batch, *, model, num_classes: int, flip: bool = False,
              axis_name: str | None = AXIS) -> jnp.ndarray:
    """Confusion matrix (C, C) of a validation batch, summed over devices; padded entries masked."""
    from cpsl_jax import evaluate

    images = batch["image"].astype(jnp.float32) / 255.0
    logits = model.apply(variables, images, train=False)["logits"]
    flip_logits = model.apply(variables, images[:, :, ::-1], train=False)["logits"][:, :, ::-1] if flip else None
    return evaluate.confusion_matrix(logits, batch["label"], batch.get("valid"), num_classes,
                                     axis_name=axis_name, flip_logits=flip_logits)


STEPS: dict[str, Callable] = {"warmup": warmup_step, "stage1": stage1_step, "stage2": distill_step,
                              "stage3": distill_step, "self_training": self_training_step}
