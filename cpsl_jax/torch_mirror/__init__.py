"""The PyTorch mirror: the reference network and the training steps in PyTorch (moved whole; split next)."""

from cpsl_jax.torch_mirror.augment import *  # noqa: F401,F403
from cpsl_jax.torch_mirror.augment import _Step  # noqa: F401
