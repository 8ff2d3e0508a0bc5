"""The CPSL pieces and losses in PyTorch: NCHW maps, float32, the reference's arithmetic.

Each function mirrors one of :mod:`cpsl_jax.cpsl` (``tests/test_benchmark.py`` checks them
against it): cross entropy and the reference's reverse cross entropy, cosine prototype
scores and rectification, the prototype-consistency and distillation KLs, the pixel-to-queue
contrastive loss, class-balanced Sinkhorn in the linear domain, the ring-buffer
:class:`Queue` and the per-image self-labeling scan.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

IGNORE_INDEX = 255


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over valid pixels: logits (B, C, H, W), labels (B, H, W) int64 (255 = ignore)."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)


def reverse_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference's RCE: ``-sum_c clip(p, 1e-7, 1) log clip(onehot, 1e-4, 1)``, sum / (valid + 1e-6)."""
    valid = labels != IGNORE_INDEX
    p = F.softmax(logits.float(), dim=1).clamp(1e-7, 1.0)
    onehot = F.one_hot(torch.where(valid, labels, 0), logits.shape[1]).permute(0, 3, 1, 2).float()
    per_pixel = -(p * torch.log(onehot.clamp(1e-4, 1.0))).sum(dim=1)
    return (per_pixel * valid).sum() / (valid.sum() + 1e-6)


def symmetric_cross_entropy(logits, labels, alpha: float = 0.1, beta: float = 1.0) -> torch.Tensor:
    return alpha * cross_entropy(logits, labels) + beta * reverse_cross_entropy(logits, labels)


def cosine_scores(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """cos(feature, prototype): features (B, D, H, W), prototypes (C, D) -> (B, C, H, W)."""
    return torch.einsum("bdhw,cd->bchw", F.normalize(features, dim=1), F.normalize(prototypes, dim=1))


@torch.no_grad()
def rectify_pseudo_labels(features, soft, prototypes_ema, temperature: float = 0.08,
                          threshold: float = 0.0) -> torch.Tensor:
    """ProDA rectification: argmax of softmax(cos(f, P_ema) / T) * soft; low confidence -> ignore.

    features (B, D, h, w) on the crop, soft (B, C, h, w) -> labels (B, h, w) int64.
    """
    rectified = F.softmax(cosine_scores(features, prototypes_ema) / temperature, dim=1) * soft
    confidence, label = rectified.max(dim=1)
    confidence = confidence / rectified.sum(dim=1)
    return torch.where(confidence < threshold, IGNORE_INDEX, label)


def prototype_consistency(teacher_scores, student_scores, valid, temperature: float = 0.08) -> torch.Tensor:
    """KL(teacher || student) of prototype softmaxes over (B, C, h, w), masked by valid (B, h, w).

    Sum over unmasked (pixel, class) entries / their count (the reference's ``mask.sum()``).
    """
    t = F.softmax(teacher_scores.detach().float() / temperature, dim=1)
    log_s = F.log_softmax(student_scores.float() / temperature, dim=1)
    mask = valid[:, None].expand_as(t)
    kl = F.kl_div(log_s, t, reduction="none")
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def distillation_kl(student_logits, teacher_logits, quirk: bool = True) -> torch.Tensor:
    """``sum t (log t - s) / (B C h w)``; s = softmax (reference quirk) or log-softmax (true KL)."""
    t = F.softmax(teacher_logits.detach().float(), dim=1)
    s = (F.softmax if quirk else F.log_softmax)(student_logits.float(), dim=1)
    return F.kl_div(s, t, reduction="sum") / t.numel()


def queue_contrastive(anchors, anchor_labels, queue, queue_labels, temperature: float = 0.08) -> torch.Tensor:
    """Pixel-to-queue contrastive loss, mean over images: anchors (B, n, D) normalised, labels (B, n).

    Positives: queue rows of the same label (ignore == ignore counts, as the reference).
    """
    positive = (anchor_labels[..., None] == queue_labels).float()  # (B, n, K)
    logits = anchors.float() @ queue.t() / temperature
    logits = logits - logits.max(dim=-1, keepdim=True).values.detach()
    exp = logits.exp()
    negatives = (exp * (1.0 - positive)).sum(dim=-1, keepdim=True)
    log_prob = logits - torch.log(exp + negatives)
    mean_pos = (positive * log_prob).sum(dim=-1) / (positive.sum(dim=-1) + 1e-5)
    return -mean_pos.mean()


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, class_prior: torch.Tensor, epsilon: float = 0.05,
             iterations: int = 3) -> torch.Tensor:
    """Class-balanced Sinkhorn-Knopp of the reference: scores (N, C) -> assignments (N, C).

    Q = exp(S / eps)^T / total; ``iterations`` x (rows to pi_c, columns to 1 / N); x N.
    """
    s = scores.float() / epsilon
    q = torch.exp(s - s.max()).t()  # the shift cancels in the division by the total
    q = q / q.sum()
    n = q.shape[1]
    prior = class_prior.float()[:, None]
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) * prior
        q = q / q.sum(dim=0, keepdim=True) / n
    return (q * n).t()


class Queue:
    """Ring buffer of the last K pushed rows (and labels); same slots as ``cpsl_jax.cpsl.push``."""

    def __init__(self, size: int, dim: int, device, with_labels: bool = False):
        self.rows = torch.zeros(size, dim, device=device)
        self.labels = torch.zeros(size, dtype=torch.int64, device=device) if with_labels else None
        self.ptr = 0
        self.count = 0

    @property
    def size(self) -> int:
        return self.rows.shape[0]

    def in_use(self) -> bool:
        return self.count >= self.size

    @torch.no_grad()
    def push(self, rows: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        rows = rows[: self.size]
        n = rows.shape[0]
        idx = (self.ptr + n - 1 - torch.arange(n, device=rows.device)) % self.size  # row 0 newest
        self.rows.index_copy_(0, idx, rows.float())
        if self.labels is not None:
            self.labels.index_copy_(0, idx, labels[:n].long())
        self.ptr = (self.ptr + n) % self.size
        self.count = min(self.count + n, self.size)

    @torch.no_grad()
    def fill_random(self, generator: torch.Generator, num_labels: int) -> None:
        """Full of random unit rows (the steady state after the first K pushes)."""
        rows = torch.randn(self.rows.shape, generator=generator).to(self.rows.device)
        self.rows.copy_(F.normalize(rows, dim=1))
        if self.labels is not None:
            self.labels.copy_(torch.randint(0, num_labels, self.labels.shape, generator=generator))
        self.ptr, self.count = 0, self.size


def self_labeling_loss(features, logits, prototypes, feature_queue: Queue, output_queue: Queue,
                       push_labels, class_prior, temperature: float = 0.08, epsilon: float = 0.05,
                       iterations: int = 3) -> tuple[torch.Tensor, bool]:
    """Per-image self-labeling scan of the reference; pushes the queues in place.

    features (B, n, D) and logits (B, n, C): the teacher's sampled rows; prototypes (C, D) get
    the gradient. Returns (mean over images of term 1 + term 2, the queue's in-use flag as
    checked before the last push).
    """
    f = F.normalize(features.detach().float(), dim=-1)
    o = F.normalize(logits.detach().float(), dim=-1)
    scores = f @ F.normalize(prototypes, dim=-1).t()  # (B, n, C)
    log_p = F.log_softmax(scores / temperature, dim=-1)
    p_detached = prototypes.detach()
    was_in_use, total = False, 0.0
    for i in range(f.shape[0]):
        with torch.no_grad():
            n = f.shape[1]
            s_i = scores[i].detach()
            q_feat = sinkhorn(torch.cat([feature_queue.rows @ p_detached.t(), s_i]) if feature_queue.in_use()
                              else s_i, class_prior, epsilon, iterations)[-n:]
            q_out = sinkhorn(torch.cat([output_queue.rows, o[i]]) if output_queue.in_use() else o[i],
                             class_prior, epsilon, iterations)[-n:]
            was_in_use = was_in_use or feature_queue.in_use()
            feature_queue.push(f[i], push_labels[i])
            output_queue.push(o[i])
        total = total - (q_feat * log_p[i]).sum(-1).mean() - (q_out * log_p[i]).sum(-1).mean()
    return total / f.shape[0], was_in_use
