"""``python -m cpsl_jax.synthetic --out DIR --layout cityscapes --domain target``."""

from cpsl_jax.synthetic.dataset import main

main()
