"""Segmentation evaluation: confusion matrix on device, IoU / mIoU / pixel accuracy on the host.

As the reference evaluates: logits at output resolution are upsampled to the label's full
resolution (bilinear, ``align_corners=True``), the argmax is the prediction, and a ``C x C``
confusion matrix (rows: ground truth, columns: prediction) counts every labelled pixel; the
ignore label and out-of-range labels are left out. Per-class IoU is
``diag / (row_sum + col_sum - diag)``, NaN for a class absent from both labels and predictions,
and the mIoU is the NaN-mean. SYNTHIA's 16-class results also report mIoU* over 13 classes
(without wall, fence and pole).

Evaluation visits every image once: the last batch is padded and a per-image ``valid`` mask
keeps padded entries out of the counts.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cpsl_jax.ops import resize_bilinear

IGNORE_INDEX = 255
# mIoU* of SYNTHIA -> Cityscapes: the 16-class indices kept (wall 3, fence 4, pole 5 dropped).
SYNTHIA_13_OF_16 = tuple(i for i in range(16) if i not in (3, 4, 5))


def full_res_probabilities(logits: jnp.ndarray, out_hw: Sequence[int],
                           flip_logits: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """(H, W, C) class probabilities of one image at full resolution.

    Softmax at output resolution, upsampled (bilinear, align_corners); with ``flip_logits``
    (logits of the flipped image, already flipped back: ``logits_of_flipped[:, ::-1]``) the two
    maps are averaged, as the reference's pseudo-label tool does. (The reference flips back
    after upsampling; align-corners sampling is mirror-symmetric, so flipping before is the
    same map.)
    """
    prob = resize_bilinear(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), out_hw, axes=(0, 1))
    if flip_logits is None:
        return prob
    prob_f = resize_bilinear(jax.nn.softmax(flip_logits.astype(jnp.float32), axis=-1), out_hw, axes=(0, 1))
    return (prob + prob_f) / 2


def predict_full_res(logits: jnp.ndarray, out_hw: Sequence[int],
                     flip_logits: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Full-resolution argmax of one image's logits, (H, W) int32.

    Without ``flip_logits`` the logits themselves are upsampled (as the reference's
    evaluation); with them, the flip-averaged probabilities of ``full_res_probabilities``.
    """
    if flip_logits is None:
        up = resize_bilinear(logits.astype(jnp.float32), out_hw, axes=(0, 1))
    else:
        up = full_res_probabilities(logits, out_hw, flip_logits)
    return jnp.argmax(up, axis=-1).astype(jnp.int32)


def full_res_predictor(model):
    """``predict(variables, image)``: jitted full-resolution argmax of one (H, W, 3) image in [0, 1]."""
    return jax.jit(lambda v, x: predict_full_res(model.apply(v, x[None], train=False)["logits"][0], x.shape[:2]))


def confusion_matrix(
    logits: jnp.ndarray,
    labels: jnp.ndarray,
    valid: Optional[jnp.ndarray],
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
    axis_name: Optional[str] = None,
    flip_logits: Optional[jnp.ndarray] = None,
) -> jnp.ndarray:
    """Per-device confusion matrix of a batch, summed over ``axis_name`` when given.

    Images are processed one at a time (``lax.map``), so only one full-resolution
    (H, W, C) float32 map is live at once (1024x2048x19 is 160 MB).

    Args:
      logits: (b, h, w, C) at the network's output resolution.
      labels: (b, H, W) integer labels (uint8); ``ignore_index`` and values >= C are skipped.
      valid: (b,) bool, False for padding entries of the last batch; None = all valid.
      num_classes: C.
      ignore_index: label value left out of the counts.
      axis_name: mesh / pmap axis to psum over (None: this device only).
      flip_logits: optional (b, h, w, C) logits of the flipped images, flipped back along w
        (flip averaging, see :func:`predict_full_res`).

    Returns:
      (C, C) int32, ``cm[true, pred]``.
    """
    if logits.ndim != 4 or labels.ndim != 3 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f'confusion_matrix: expected logits (b, h, w, C) and labels (b, H, W), '
                         f'got {logits.shape} and {labels.shape}')
    if logits.shape[-1] != num_classes:
        raise ValueError(f'confusion_matrix: logits have {logits.shape[-1]} classes, '
                         f'num_classes is {num_classes}')
    if flip_logits is not None and flip_logits.shape != logits.shape:
        raise ValueError(f'confusion_matrix: flip_logits {flip_logits.shape} != logits '
                         f'{logits.shape}')
    b = logits.shape[0]
    out_hw = labels.shape[1:]
    if valid is None:
        valid = jnp.ones((b,), bool)
    n_bins = num_classes * num_classes

    def one_image(args):
        if flip_logits is None:
            lg, lab, ok = args
            pred = predict_full_res(lg, out_hw)
        else:
            lg, flg, lab, ok = args
            pred = predict_full_res(lg, out_hw, flg)
        lab = lab.astype(jnp.int32)
        keep = (lab != ignore_index) & (lab >= 0) & (lab < num_classes) & ok
        # Dropped pixels go to one extra bin, so ignore labels never index the matrix.
        idx = jnp.where(keep, lab * num_classes + pred, n_bins)
        return jnp.bincount(idx.reshape(-1), length=n_bins + 1)[:n_bins].astype(jnp.int32)

    xs = (logits, labels, valid) if flip_logits is None else (logits, flip_logits, labels, valid)
    counts = lax.map(one_image, xs).sum(axis=0)
    cm = counts.reshape(num_classes, num_classes)
    if axis_name is not None:
        cm = lax.psum(cm, axis_name)
    return cm


def sum_over_processes(cm) -> np.ndarray:
    """Sums host-local confusion matrices over all processes; returns int64 NumPy.

    For matrices accumulated per process (each host's own images). A matrix already psummed
    over a mesh that spans every process is global: pass it to ``np.asarray`` instead.
    Single-process runs return the matrix itself.
    """
    local = np.asarray(cm, dtype=np.int64)
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils  # only needed on multi-host runs
    gathered = multihost_utils.process_allgather(local, tiled=False)
    return np.asarray(gathered, dtype=np.int64).sum(axis=0)


def iou_from_confusion(cm, subsets: Optional[Mapping[str, Sequence[int]]] = None) -> dict:
    """Per-class IoU, mIoU and pixel accuracy from a (C, C) ``cm[true, pred]`` (NumPy float64).

    Args:
      cm: confusion matrix, rows = ground truth.
      subsets: optional name -> class indices; each adds the NaN-mean IoU over those classes
        under its name (e.g. ``{'miou_13': SYNTHIA_13_OF_16}`` for SYNTHIA's mIoU*).

    Returns:
      dict with ``miou`` (float), ``per_class_iou`` ((C,) float64, NaN for classes absent from
      both labels and predictions), ``pixel_accuracy`` (float) and one float per subset.
    """
    cm = np.asarray(cm, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f'iou_from_confusion: expected a square matrix, got {cm.shape}')
    diag = np.diag(cm)
    union = cm.sum(axis=0) + cm.sum(axis=1) - diag
    with np.errstate(divide='ignore', invalid='ignore'):
        iou = diag / union
        acc = diag.sum() / cm.sum()
    out = dict(miou=_nanmean(iou), per_class_iou=iou, pixel_accuracy=float(acc))
    for name, idx in (subsets or {}).items():
        idx = list(idx)
        if not idx or min(idx) < 0 or max(idx) >= len(iou):
            raise ValueError(f'iou_from_confusion: subset {name!r} has indices outside '
                             f'0..{len(iou) - 1}: {idx}')
        out[name] = _nanmean(iou[idx])
    return out


def _nanmean(x: np.ndarray) -> float:
    """NaN-mean without NumPy's empty-slice warning (all NaN gives NaN)."""
    finite = ~np.isnan(x)
    return float(x[finite].mean()) if finite.any() else float('nan')


def format_iou_table(result: Mapping, class_names: Sequence[str]) -> str:
    """A per-class IoU table (percent) followed by mIoU, subsets and pixel accuracy."""
    iou = np.asarray(result['per_class_iou'])
    if len(class_names) != len(iou):
        raise ValueError(f'format_iou_table: {len(class_names)} class names for '
                         f'{len(iou)} classes')
    width = max(len(n) for n in class_names)
    lines = [f'{"class":<{width}}  IoU']
    lines += [f'{n:<{width}}  {100 * v:6.2f}' for n, v in zip(class_names, iou)]
    for key, value in result.items():
        if key != 'per_class_iou' and np.ndim(value) == 0:  # scalars only (not a confusion matrix)
            lines.append(f'{key:<{width}}  {100 * float(value):6.2f}')
    return '\n'.join(lines)
