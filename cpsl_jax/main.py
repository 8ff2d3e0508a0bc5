"""Command line: ``python -m cpsl_jax.main --config=configs/gta5.py:stage1 --workdir=runs/stage1``.

The config file's ``get_config(arg)`` gives the run; ``--config.x.y=value`` overrides a key.
Unknown keys (with the closest ones), values of the wrong type, batches that do not divide over
the devices, missing paths and a config that differs from the one the workdir's checkpoints
were written with fail here, before anything is compiled, as one ``error: ...`` line on stderr
and exit status 2 (``cpsl_jax/config_check.py``). The workdir receives
the config, checkpoints, TensorBoard events, ``log.txt``, ``metrics.jsonl`` and
``summary.json``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from cpsl_jax import config_check, defaults

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
        raise defaults.ConfigError("; ".join(problems))


def run(config, workdir: str) -> dict:
    """Run what ``config.stage`` says; returns its summary."""
    config_check.validate(config)
    config_check.check_batch_sizes(config)
    check_paths(config)
    config_check.check_resume(config, workdir)
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
        _fail(err, status=2)
    except Exception as err:
        from cpsl_jax.train.checkpoint import CheckpointError
        from cpsl_jax.train.guards import NonFiniteError

        if isinstance(err, (CheckpointError, NonFiniteError)):  # the run's own verdicts: no traceback to add
            _fail(err, status=1)
        raise


def _fail(message: object, status: int) -> None:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every config error as one line (exit status 2): unknown
    override keys are found before ml_collections reads them (it fails on them with a bare
    ``AttributeError``), values it cannot read are named with the key's type."""
    try:
        config_check.check_overrides(argv)
        return flags.FLAGS(argv)
    except defaults.ConfigError as err:
        _fail(err, status=2)
    except flags.Error as err:
        _fail(config_check.flag_error(err, argv), status=2)
    raise AssertionError("unreachable")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
