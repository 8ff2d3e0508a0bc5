"""Moved: the synthetic domains are the package ``cpsl_jax.synthetic``."""

import sys

_MOVED = ("cpsl_jax.data.synthetic moved to the package cpsl_jax.synthetic: import from there, "
          "and run it as python -m cpsl_jax.synthetic")
if __name__ == "__main__":
    sys.exit(f"error: {_MOVED}")
raise ImportError(_MOVED)
