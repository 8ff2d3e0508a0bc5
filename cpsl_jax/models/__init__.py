"""Segmentation networks of CPSL (Flax Linen) and their parameter-group labels.

The PyTorch reference network lives in :mod:`cpsl_jax.torch_mirror.network`, outside this
package: torch is an optional dependency, and nothing here imports it.
"""

from cpsl_jax.models.deeplab import (
    STAGE_SIZES,
    ASPPHead,
    Bottleneck,
    DeepLabV2,
    backbone_multiplicity,
    init_variables,
    output_size,
    param_labels,
    variable_shapes,
)
from cpsl_jax.models.discriminator import Discriminator
from cpsl_jax.models.layers import conv2d
from cpsl_jax.models.norm import BatchNorm

__all__ = [
    "STAGE_SIZES",
    "ASPPHead",
    "BatchNorm",
    "Bottleneck",
    "DeepLabV2",
    "Discriminator",
    "backbone_multiplicity",
    "conv2d",
    "init_variables",
    "output_size",
    "param_labels",
    "variable_shapes",
]
