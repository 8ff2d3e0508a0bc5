"""Stages 2 and 3 in PyTorch: the mirror of :func:`cpsl_jax.train.steps.distill_step`."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from cpsl_jax.torch_mirror.augment import move_to_strong, weak_view
from cpsl_jax.torch_mirror.common import Step, batch_norms, build_network, make_sgd, running_stats_frozen
from cpsl_jax.torch_mirror.cpsl import IGNORE_INDEX, distillation_kl


class DistillStep(Step):
    """Stages 2/3 (``steps.distill_step``): student on the source crop and the strong view, frozen teacher."""

    def __init__(self, config, mode: str = "fp32", device="cpu", seed: int = 0):
        super().__init__(config, mode, device, seed)
        torch.manual_seed(seed)
        self.student = self._prepare(build_network(config))
        self.student_norms = batch_norms(self.student)
        self.teacher = self._prepare(build_network(config, bn_pretrain=False)).eval().requires_grad_(False)
        self.student_fwd, self.teacher_fwd = self._compiled(self.student), self._compiled(self.teacher)
        self.optimizer = make_sgd(self.student, config)

    def fill_queues(self) -> None:
        pass

    def step(self, batch: dict) -> dict[str, torch.Tensor]:
        kd = self.config.kd
        self._set_lr(self.optimizer)
        with torch.no_grad():
            src_img, src_lbl = self.source_view(batch["source"])
            target = batch["target"]
            weak, _, strong, strong_img = self.target_views(target["image"])
            # Hard pseudo label: onto the crop, x0.25 nearest, onto the strong view (outside -> ignore).
            label = weak_view(target["pseudo_label"][:, None], weak, self.crop_hw, mode="nearest")
            label = F.interpolate(label, size=self.quarter, mode="nearest")
            label, valid = move_to_strong(label, strong, self.crop_hw)
            label = torch.where(valid, label[:, 0].long(), IGNORE_INDEX)
            with self._autocast():
                t_logits = self.teacher_fwd(self._input(strong_img))["out"].float()
            t_logits = F.interpolate(t_logits, size=self.quarter, mode="bilinear", align_corners=True)
        with self._autocast():
            with running_stats_frozen(self.student_norms, self.config.kd.target_running_stats):
                out_s = self.student_fwd(self._input(src_img))
            out_t = self.student_fwd(self._input(strong_img))
        source_ce = self._segmentation_loss(out_s["out"].float(), src_lbl, rce=False)
        s_logits = F.interpolate(out_t["out"].float(), size=self.quarter, mode="bilinear", align_corners=True)
        target_ce = self._segmentation_loss(s_logits, label, rce=kd.rce)
        kl = distillation_kl(s_logits, t_logits, quirk=kd.quirk)
        total = source_ce + target_ce + kd.weight * kl
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        self.step_count += 1
        return dict(loss=total.detach(), source_ce=source_ce.detach(), target_ce=target_ce.detach(), kd=kl.detach())
