"""The CPSL method as pure, vectorised JAX functions (project imports: ``cpsl_jax.ops`` only).

Every function works on one device's arrays; the ones with ``axis_name`` follow the
project's loss convention (a *share* = local numerator / psum of the global normaliser) or,
for the self-labeling scan and the prototype update, gather all devices' rows so every
device computes the same state.

Reference quirks reproduced by default, and the switch that gives the paper's intent:

* Self-labeling is a sequential scan over the images of the global batch with a queue push
  between images -> ``self_labeling_loss(batched=True)``: one Sinkhorn over the batch.
* Queue rows enter Sinkhorn as ``F @ P^T`` with the un-normalised, detached P (the new rows
  use normalised P) -> no switch (the published results depend on it; P starts normalised
  and stays close to unit norm).
* Labels pushed with the feature queue are the first n raster entries of ``threshold_SL``
  (its top row) -> ``queue_push_labels(quirk=False)`` reads them at the sampled positions.
* Contrastive anchors' labels are ``threshold_SL`` (129x257) flattened at indices on the
  student's 65x113 grid -> ``anchor_labels(quirk=False)`` with a map on the anchor grid.
* Contrastive positives include ignore == ignore (no masking) -> none; as the reference.
* Distillation KL uses student probabilities where log-probabilities belong ->
  ``distillation_kl(quirk=False)``.
* Ignore label: 255 here (uint8 maps), 250 in the reference.

Safety deviations (equal to the reference wherever the reference is finite): Sinkhorn runs in
the log domain (no overflow at eps 0.05 for logits of magnitude 50) and gives a zero-prior
class zero mass instead of nan; CE over a batch without valid pixels is 0 instead of nan.
"""

from cpsl_jax.cpsl.cutmix import box_from_uniforms, box_mask, mix_images, mix_labels, sample_cutmix
from cpsl_jax.cpsl.losses import (
    IGNORE_INDEX,
    anchor_labels,
    contrastive_share,
    cross_entropy,
    distillation_kl,
    prototype_consistency,
    queue_contrastive,
    reverse_cross_entropy,
    sample_anchors,
    symmetric_cross_entropy,
)
from cpsl_jax.cpsl.prior import class_pixel_counts, class_prior
from cpsl_jax.cpsl.prototypes import (
    PrototypeState,
    cosine_scores,
    ema_prototypes,
    image_class_means,
    init_prototype_state,
    rectify_pseudo_labels,
    update_prototype_state,
)
from cpsl_jax.cpsl.queues import Queue, in_use, init_queue, push
from cpsl_jax.cpsl.self_labeling import gather_positions, queue_push_labels, sample_positions, self_labeling_loss
from cpsl_jax.cpsl.sinkhorn import sinkhorn, sinkhorn_log_plan

__all__ = [
    "IGNORE_INDEX", "PrototypeState", "Queue", "anchor_labels", "box_from_uniforms", "box_mask",
    "class_pixel_counts", "class_prior", "contrastive_share", "cosine_scores", "cross_entropy",
    "distillation_kl", "ema_prototypes", "gather_positions", "image_class_means", "in_use",
    "init_prototype_state", "init_queue", "mix_images", "mix_labels", "prototype_consistency",
    "push", "queue_contrastive", "queue_push_labels", "rectify_pseudo_labels",
    "reverse_cross_entropy", "sample_anchors", "sample_cutmix", "sample_positions",
    "self_labeling_loss", "sinkhorn", "sinkhorn_log_plan", "symmetric_cross_entropy",
    "update_prototype_state",
]
