"""Non-finite losses and gradients: the step refuses the update, the host stops the run.

``skip_nonfinite(step)`` wraps a per-device step: when the (global) loss, the gradient norm or
the updated parameters are not finite, the new state is dropped on the device (only the step counter advances) and the
state's ``nonfinite_streak`` counts the steps refused in a row (``nonfinite_worst``: the
longest such run so far). The host reads the latter with the metrics it logs anyway and
stops the run once it exceeds
``config.train.nonfinite_skip`` (0: at the first one), so the parameters, and every
checkpoint, stay those of the last good step. No extra host round trip per step.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax


class NonFiniteError(RuntimeError):
    """The loss or the gradients stopped being finite."""


def skip_nonfinite(step: Callable[[Any, Any], tuple[Any, Any]]) -> Callable[[Any, Any], tuple[Any, Any]]:
    def guarded(state, batch):
        new, metrics = step(state, batch)
        # The loss, the gradients and the updated parameters (an overflowing update) must be finite.
        ok = (jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
              & jnp.isfinite(optax.tree.norm(new.params)))
        kept = state.replace(step=new.step)
        new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, kept)
        streak = jnp.where(ok, 0, state.nonfinite_streak + 1).astype(jnp.int32)
        worst = jnp.maximum(state.nonfinite_worst, streak)
        new = new.replace(nonfinite_streak=streak, nonfinite_worst=worst)
        return new, {**metrics, "nonfinite_worst": worst.astype(jnp.float32)}

    return guarded


def check(metrics: dict[str, float], limit: int, step: int) -> None:
    """Raise when more than ``limit`` steps in a row were refused (host side, at log steps)."""
    streak = int(metrics.get("nonfinite_worst", 0))
    if streak > limit:
        raise NonFiniteError(
            f"step {step}: the loss or the gradients were not finite for {streak} step(s) in a row "
            f"(train.nonfinite_skip={limit}); the parameters are those of the last finite step and the "
            f"checkpoints were not touched by the bad steps. Last metrics: {metrics}")
