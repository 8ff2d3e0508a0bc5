"""cpsl_jax: Class-Balanced Pixel-Level Self-Labeling (CPSL, CVPR 2022) in JAX/Flax."""

__version__ = "0.1.0"
