"""Dense network FLOPs of a training step, counted analytically from the config (no tracing).

The count matches :func:`cpsl_jax.torch_mirror.count_flops` (forward hooks on the PyTorch
network); ``tests/test_benchmark.py`` checks both.
"""

from __future__ import annotations

from typing import Sequence

from cpsl_jax.models.deeplab import ASPP_DILATIONS, EXPANSION, LAYER_GEOMETRY, STAGE_SIZES

# Dense bf16 peak of one H100/H200 SXM.
BF16_PEAK_FLOPS = 790e12
FLOPS_DEFINITION = ("dense network FLOPs per step: every convolution and linear layer, taps in the padding "
                    "counted; forward + backward = 3x forward for student passes, 1x for the no-grad teacher; "
                    "stage 1 = 3 student passes at the crop + the teacher at base size, stage 2/3 = 2 student "
                    "passes + the teacher at the crop. The CPSL heads (Sinkhorn, queues, contrastive) are not "
                    "counted.")


def network_flops(config, batch: int, hw: Sequence[int]) -> int:
    """Dense forward FLOPs of the segmenter on (batch, H, W): convolutions and linears, all taps."""
    m = config.model

    def conv(cin, cout, k, h, w):
        return 2 * batch * cout * h * w * cin * k * k

    h, w = (int(hw[0]) - 1) // 2 + 1, (int(hw[1]) - 1) // 2 + 1
    total = conv(3, m.width, 7, h, w)
    h, w = -(-(h - 1) // 2) + 1, -(-(w - 1) // 2) + 1  # ceil-mode max-pool
    inplanes = m.width
    for layer, (blocks, (stride, _)) in enumerate(zip(STAGE_SIZES[m.depth], LAYER_GEOMETRY), start=1):
        planes = m.width * 2 ** (layer - 1)
        for i in range(blocks):
            s = stride if i == 0 else 1
            h, w = (h - 1) // s + 1, (w - 1) // s + 1
            total += conv(inplanes, planes, 1, h, w) + conv(planes, planes, 3, h, w)
            total += conv(planes, planes * EXPANSION, 1, h, w)
            if i == 0:
                total += conv(inplanes, planes * EXPANSION, 1, h, w)
            inplanes = planes * EXPANSION
    head = m.head_width
    cat = head * (len(ASPP_DILATIONS) + 1)
    total += conv(inplanes, head, 1, h, w) + len(ASPP_DILATIONS) * conv(inplanes, head, 3, h, w)
    total += 2 * (2 * batch * cat * (cat // 16))  # squeeze-excitation linears
    total += conv(cat, head, 3, h, w) + conv(head, m.num_classes, 1, h, w)
    return total


def step_flops(config) -> int:
    """Dense network FLOPs of one training step of ``config.stage`` (see :data:`FLOPS_DEFINITION`)."""
    b = config.data.batch_size
    crop = (config.data.crop_size[1], config.data.crop_size[0])
    student = network_flops(config, b, crop)
    if config.stage == "stage1":
        tw, th = config.data.target_base_size
        return 3 * 3 * student + network_flops(config, b, (th, tw))
    return 3 * 2 * student + student
