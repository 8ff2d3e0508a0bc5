"""CPSL stage 1 in PyTorch: the mirror of :func:`cpsl_jax.train.steps.stage1_step`."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from cpsl_jax.torch_mirror.augment import full2weak, mix_labels, move_to_strong, sample_cutmix, soft_label_to_weak
from cpsl_jax.torch_mirror.common import Step, batch_norms, build_network, make_sgd, running_stats_frozen
from cpsl_jax.torch_mirror.cpsl import (
    Queue,
    cosine_scores,
    prototype_consistency,
    queue_contrastive,
    rectify_pseudo_labels,
    self_labeling_loss,
)


class Stage1Step(Step):
    """CPSL stage 1 (``steps.stage1_step``): ``step(batch)`` runs one iteration and returns loss parts."""

    def __init__(self, config, mode: str = "fp32", device="cpu", seed: int = 0):
        super().__init__(config, mode, device, seed)
        torch.manual_seed(seed)
        c, m = config.cpsl, config.model
        self.student = self._prepare(build_network(config))
        self.student_norms = batch_norms(self.student)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.student_fwd, self.teacher_fwd = self._compiled(self.student), self._compiled(self.teacher)
        protos = torch.randn(m.num_classes, m.head_width, generator=self.generator)
        self.prototypes = nn.Parameter(protos.to(self.device))
        self.prototypes_ema = protos.clone().to(self.device)
        self.feature_queue = Queue(c.queue_size, m.head_width, self.device, with_labels=True)
        self.output_queue = Queue(c.queue_size, m.num_classes, self.device)
        self.class_prior = torch.full((m.num_classes,), 1.0 / m.num_classes, device=self.device)
        self.optimizer = make_sgd(self.student, config, self.prototypes)

    def fill_queues(self) -> None:
        """Start from full queues (training's steady state: after 64 iterations at the paper's sizes)."""
        self.feature_queue.fill_random(self.generator, self.config.model.num_classes)
        self.output_queue.fill_random(self.generator, self.config.model.num_classes)

    def _teacher_maps(self, target, weak, strong):
        """Teacher pass and every map derived from it (no gradient)."""
        c = self.config.cpsl
        self.teacher.train(c.teacher_train_mode)
        with self._autocast():
            out = self.teacher_fwd(self._input(target["image"].float() / 255.0))
        logits, feats = out["out"].float(), out["feat"].float()
        base_hw = target["image"].shape[2:]
        feats_quarter = F.interpolate(feats, size=(base_hw[0] // 4, base_hw[1] // 4), mode="bilinear",
                                      align_corners=True)
        feats_weak = full2weak(feats_quarter, weak, self.crop_hw)
        soft = soft_label_to_weak(target["soft_label"], weak, self.crop_hw, self.quarter)
        if c.rectify:
            label_sl = rectify_pseudo_labels(feats_weak, soft, self.prototypes_ema, c.temperature, c.rectify_threshold)
        else:
            label_sl = soft.argmax(dim=1)
        label_sl_teacher = F.interpolate(label_sl[:, None].float(), size=feats.shape[2:], mode="nearest")[:, 0].long()
        scores_strong, valid = move_to_strong(cosine_scores(feats_weak, self.prototypes_ema), strong, self.crop_hw)
        return logits, feats, label_sl, label_sl_teacher, scores_strong, valid

    def step(self, batch: dict) -> dict[str, torch.Tensor]:
        c = self.config.cpsl
        n = c.samples_per_image
        self._set_lr(self.optimizer)
        with torch.no_grad():
            src_img, src_lbl = self.source_view(batch["source"])
            weak, weak_img, strong, strong_img = self.target_views(batch["target"]["image"])
            cutmix, box = sample_cutmix(self.rng, self.crop_hw, c.cutmix_prob)
            mixed_img = weak_img
            if cutmix:
                mixed_img = weak_img.clone()
                mixed_img[:, :, box[0]:box[2], box[1]:box[3]] = src_img[:, :, box[0]:box[2], box[1]:box[3]]
            t_logits, t_feats, label_sl, label_sl_teacher, t_scores_strong, strong_valid = self._teacher_maps(
                batch["target"], weak, strong)
            target_lbl = mix_labels(label_sl, src_lbl, box) if cutmix else label_sl
            positions = torch.randperm(t_feats.shape[2] * t_feats.shape[3], generator=self.generator)[:n]
            positions = positions.to(self.device)
            sl_feats = t_feats.flatten(2)[:, :, positions].transpose(1, 2)
            sl_logits = t_logits.flatten(2)[:, :, positions].transpose(1, 2)
            flat_sl = label_sl_teacher.flatten(1)
            push_labels = flat_sl[:, :n] if c.queue_label_quirk else flat_sl[:, positions]

        # With ``target_running_stats`` only the weak target pass moves the running statistics.
        with self._autocast():
            with running_stats_frozen(self.student_norms, c.target_running_stats):
                out_s = self.student_fwd(self._input(src_img))
            out_w = self.student_fwd(self._input(mixed_img))
            with running_stats_frozen(self.student_norms, c.target_running_stats):
                out_st = self.student_fwd(self._input(strong_img))
        source_ce = self._segmentation_loss(out_s["out"].float(), src_lbl, rce=False)
        target_ce = self._segmentation_loss(out_w["out"].float(), target_lbl, rce=c.rce)
        sl, was_in_use = self_labeling_loss(sl_feats, sl_logits, self.prototypes, self.feature_queue,
                                            self.output_queue, push_labels, self.class_prior, c.temperature,
                                            c.epsilon, c.sinkhorn_iterations)
        contrast = torch.zeros((), device=self.device)
        if was_in_use and not cutmix:
            feats_w = out_w["feat"].float()
            b, d, fh, fw = feats_w.shape
            idx = torch.stack([torch.randperm(fh * fw, generator=self.generator)[:n] for _ in range(b)])
            idx = idx.to(self.device)
            anchors = F.normalize(torch.gather(feats_w.flatten(2), 2, idx[:, None].expand(b, d, n)), dim=1)
            a_map = label_sl_teacher if c.anchor_label_quirk else F.interpolate(
                label_sl[:, None].float(), size=(fh, fw), mode="nearest")[:, 0].long()
            a_labels = torch.gather(a_map.flatten(1), 1, idx)
            contrast = queue_contrastive(anchors.transpose(1, 2), a_labels, self.feature_queue.rows,
                                         self.feature_queue.labels, c.temperature)
        s_feats = F.interpolate(out_st["feat"].float(), size=self.quarter, mode="bilinear", align_corners=True)
        consistency = prototype_consistency(t_scores_strong, cosine_scores(s_feats, self.prototypes_ema),
                                            strong_valid, c.temperature)
        total = (source_ce + target_ce + c.sl_weight * sl + c.contrastive_weight * contrast
                 + c.consistency_weight * consistency)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        self._ema()
        self.step_count += 1
        return dict(loss=total.detach(), source_ce=source_ce.detach(), target_ce=target_ce.detach(),
                    self_labeling=sl.detach(), contrastive=contrast.detach(), consistency=consistency.detach())

    @torch.no_grad()
    def _ema(self) -> None:
        c = self.config.cpsl
        t_params, s_params = list(self.teacher.parameters()), list(self.student.parameters())
        torch._foreach_mul_(t_params, c.teacher_ema)
        torch._foreach_add_(t_params, s_params, alpha=1.0 - c.teacher_ema)
        for t_buf, s_buf in zip(self.teacher.buffers(), self.student.buffers()):
            t_buf.copy_(s_buf)
        self.prototypes_ema.mul_(c.prototype_ema).add_(self.prototypes.detach(), alpha=1.0 - c.prototype_ema)
