"""The PyTorch mirror: the reference network and the stage-1 and stage-2/3 training steps in PyTorch.

The same work as :func:`cpsl_jax.train.steps.stage1_step` and :func:`~cpsl_jax.train.steps.distill_step`
for a given config, written the way a PyTorch user runs such a method on one device: eager
NCHW modules (:class:`~cpsl_jax.torch_mirror.network.ResNet101` with the config's depth,
width, head width and class count), Python loops where the reference loops (per image in
the weak view and the self-labeling scan), host-side random draws (as a data loader
makes them), ``torch.optim.SGD``. :mod:`cpsl_jax.benchmark` times it against the JAX steps;
the tests use it as the reference to check the JAX code against. Importing this package
imports torch; nothing outside the tests, the benchmark's torch variants and this package
imports it (the checkpoint converter, :mod:`cpsl_jax.convert`, loads torch files on its own).

Modules:

* :mod:`~cpsl_jax.torch_mirror.network`: the reference segmenter and discriminator (same
  state-dict names as the official checkpoints), :func:`count_flops`;
* :mod:`~cpsl_jax.torch_mirror.cpsl`: losses, prototypes, Sinkhorn, queues, the self-labeling scan;
* :mod:`~cpsl_jax.torch_mirror.augment`: colour transfer, weak and strong views, map transport, CutMix;
* :mod:`~cpsl_jax.torch_mirror.common`: modes, network and SGD builders, BatchNorm switches,
  the :class:`Step` both stages share;
* :mod:`~cpsl_jax.torch_mirror.stage1` and :mod:`~cpsl_jax.torch_mirror.distill`: the two
  step classes; :func:`make_step` picks one by ``config.stage``.

Modes (:data:`MODES`):

* ``fp32``: float32 NCHW, as the reference runs (``cudnn.benchmark`` on, TF32 allowed on GPUs);
* ``bf16``: ``torch.autocast(bfloat16)`` around the network passes + ``channels_last``;
* ``compile``: ``bf16`` with the student and teacher wrapped in ``torch.compile``.

Losses and the CPSL pieces always run in float32 (the JAX model also returns float32 maps).

Same as the JAX step (and checked against :mod:`cpsl_jax.cpsl` in ``tests/test_benchmark.py``):
the losses (CE over valid pixels, 0.1 CE + 1.0 RCE on the target crop, prototype
consistency KL, pixel-to-queue contrastive with the reference's quirks, distillation KL with
the probability quirk), cosine prototype scores and rectification, class-balanced Sinkhorn,
the per-image self-labeling scan with queue pushes between images (ring buffers, rows in the
same slots as :func:`cpsl_jax.cpsl.push`), one backward of the summed loss, SGD with
momentum, coupled weight decay, poly decay and the config's per-group multipliers (with
``optim.repeated_updates`` the reference's parameter list with repeated backbone tensors and
``foreach=False``, which is the reference's update exactly), the EMA teacher (parameters;
buffers copied from the student) and the prototype EMA.

What differs (similar cost, simpler arithmetic; none of it changes a shape or a FLOP count of
the networks):

* Sinkhorn runs in the linear domain as the reference (``exp`` after subtracting the
  maximum), not in the log domain; a class with prior 0 gives nan as in the reference.
* Colour transfer: the same sRGB/CIELAB formulas in float32, without Pillow's rounding.
* Weak view: ``F.interpolate(antialias=True)`` of each whole image to (h, w), crop, flip
  (Pillow's 8-bit intermediate rounding skipped); labels nearest.
* Strong view: flip, 5-tap Gaussian blur, colour jitter in a fixed order (brightness,
  contrast, saturation, hue as a YIQ rotation), then the two RandAugment draws with their
  geometric ops composed into one ``grid_sample`` (bilinear, fill 127) applied before the
  photometric ones, then cutout; maps follow with the same affine matrix (nearest, zero
  padding, cutout masked). The JAX view reproduces Pillow op by op in the drawn order.
* Soft pseudo labels reach the crop with one ``grid_sample`` at the composed coordinates
  (the reference chains three bilinear resizes); the teacher's features are moved by
  ``grid_sample`` at the coordinates of the reference's resize-crop-flip (exact).
* Random numbers come from Python's ``random`` (augmentation, CutMix) and torch's generator
  (sampled positions, anchors, dropout), so the two frameworks see different draws.
* The contrastive term is computed only on iterations where it counts (the JAX step
  computes it always and multiplies by 0).

``cpsl.target_running_stats`` and ``kd.target_running_stats`` are followed as in the JAX
steps: the passes they keep from the running statistics run with BatchNorm momentum 0.
"""

from __future__ import annotations

from typing import Any

from cpsl_jax.torch_mirror.common import (
    MODES,
    Step,
    batch_norms,
    build_network,
    configure_backends,
    make_sgd,
    running_stats_frozen,
    to_device_batch,
)
from cpsl_jax.torch_mirror.cpsl import (
    IGNORE_INDEX,
    Queue,
    cosine_scores,
    cross_entropy,
    distillation_kl,
    prototype_consistency,
    queue_contrastive,
    rectify_pseudo_labels,
    reverse_cross_entropy,
    self_labeling_loss,
    sinkhorn,
    symmetric_cross_entropy,
)
from cpsl_jax.torch_mirror.distill import DistillStep
from cpsl_jax.torch_mirror.network import FCDiscriminator, ResNet101, count_flops
from cpsl_jax.torch_mirror.stage1 import Stage1Step


def make_step(config, mode: str = "fp32", device: Any = "cpu", seed: int = 0) -> Step:
    """The PyTorch step object of ``config.stage`` (stage1, stage2 or stage3)."""
    if config.stage == "stage1":
        return Stage1Step(config, mode, device, seed)
    if config.stage in ("stage2", "stage3"):
        return DistillStep(config, mode, device, seed)
    raise ValueError(f"no PyTorch step for stage {config.stage!r}")


__all__ = [
    "IGNORE_INDEX",
    "MODES",
    "DistillStep",
    "FCDiscriminator",
    "Queue",
    "ResNet101",
    "Stage1Step",
    "Step",
    "batch_norms",
    "build_network",
    "configure_backends",
    "cosine_scores",
    "count_flops",
    "cross_entropy",
    "distillation_kl",
    "make_sgd",
    "make_step",
    "prototype_consistency",
    "queue_contrastive",
    "rectify_pseudo_labels",
    "reverse_cross_entropy",
    "running_stats_frozen",
    "self_labeling_loss",
    "sinkhorn",
    "symmetric_cross_entropy",
    "to_device_batch",
]
