"""``python -m cpsl_jax.benchmark``: see :mod:`cpsl_jax.benchmark`."""

from cpsl_jax.benchmark import main

if __name__ == "__main__":
    main()
