"""Command line: ``python -m cpsl_jax.main --config=configs/gta5.py:stage1 --workdir=runs/stage1``.

The config file's ``get_config(arg)`` gives the run; ``--config.x.y=value`` overrides a key.
Unknown keys and missing paths fail here, before anything is compiled. The workdir receives
the config, checkpoints, TensorBoard events, ``log.txt``, ``metrics.jsonl`` and
``summary.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from cpsl_jax import defaults

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file (e.g. configs/gta5.py:stage1)", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, logs and outputs")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() first (multi-host: "
                                  "SLURM and Cloud TPU pods are detected from the environment)")
flags.mark_flags_as_required(["config", "workdir"])

log = logging.getLogger("cpsl_jax")

# Paths each stage reads: (config key, what it is).
_REQUIRED_PATHS = {
    "warmup": [],
    "lab_stats": [],
    "stage1": [("init.checkpoint", "warm-up model"), ("data.pseudo_labels", "soft pseudo-label store"),
               ("init.prototypes", "initial prototypes"), ("init.class_distribution", "class distribution")],
    "stage2": [("init.teacher", "stage-1 model"), ("data.pseudo_labels", "hard pseudo-label store")],
    "stage3": [("init.checkpoint", "stage-2 model"), ("init.teacher", "stage-2 model"),
               ("data.pseudo_labels", "hard pseudo-label store")],
    "eval": [("init.checkpoint", "model to evaluate")],
    "soft_labels": [("init.checkpoint", "warm-up model")],
    "prototypes": [("init.checkpoint", "warm-up model")],
    "class_distribution": [("init.checkpoint", "warm-up model")],
    "hard_labels": [("init.checkpoint", "model")],
    "self_training": [("init.checkpoint", "warm-up model"), ("data.pseudo_labels", "hard pseudo-label store")],
}


def check_paths(config) -> None:
    """Every path the stage reads exists; names the config key when not."""
    problems = []
    for key, what in _REQUIRED_PATHS.get(config.stage, []):
        section, name = key.split(".")
        value = config[section][name]
        if not value:
            problems.append(f"{key} is empty ({what})")
        elif not Path(value).exists() and not (key == "data.pseudo_labels" and config.stage in (
                "soft_labels", "hard_labels")):
            problems.append(f"{key}={value} does not exist ({what})")
    for domain in ("source", "target"):
        name, root = config.data[domain], config.data[f"{domain}_root"]
        if not name.startswith("synthetic-"):
            if not root:
                problems.append(f"data.{domain}_root is empty ({name} dataset)")
            elif not Path(root).is_dir():
                problems.append(f"data.{domain}_root={root} is not a folder ({name} dataset)")
    if problems:
        raise defaults.ConfigError("config error:\n  " + "\n  ".join(problems))


def run(config, workdir: str) -> dict:
    """Run what ``config.stage`` says; returns its summary."""
    defaults.validate(config)
    check_paths(config)
    Path(workdir).mkdir(parents=True, exist_ok=True)
    (Path(workdir) / "config.json").write_text(json.dumps(config.to_dict(), indent=1, default=str) + "\n")
    stage = config.stage
    if stage in defaults.TRAINING_STAGES:
        from cpsl_jax.train import loop

        return loop.train(config, workdir)
    from cpsl_jax import tools

    return tools.run(config, workdir)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _DISTRIBUTED.value:
        import jax

        jax.distributed.initialize()
    try:
        run(_CONFIG.value, _WORKDIR.value)
    except defaults.ConfigError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    app.run(main)
