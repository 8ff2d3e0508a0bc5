"""Config checks that run before anything is compiled, each failing in one line that names the key.

- ``check_overrides(argv)``: the config file loads, and every ``--config.x.y=`` override names
  one of its keys (else the closest keys, found with difflib); run before ml_collections
  parses the flags.
- ``flag_error(err, argv)``: a value ml_collections could not read, as key, value and type.
- ``validate(config)``: no unknown key, every type right, a known stage and dtype.
- ``check_types(config)``: every value has the schema's type (``defaults.base()``); tuples
  their length (``--config.data.crop_size=64`` reads as ``(64,)``).
- ``check_batch_sizes(config)``: the global batches divide over the processes and devices.
- ``check_resume(config, workdir)``: a workdir that holds checkpoints resumes only the config
  that wrote them; ``RESUMABLE`` lists what may change between its runs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import ml_collections as mlc

from cpsl_jax import defaults

# Keys a resumed run may change: how long it runs, how often it logs, evaluates and saves,
# where the data are read from and how it is evaluated; not what a training step computes.
RESUMABLE = ("train.steps", "train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
             "train.nonfinite_skip", "data.worker_count", "data.eval_batch_size", "data.source_root",
             "data.target_root", "eval.")


def _config_argument(argv: Sequence[str]) -> str | None:
    """The value of ``--config`` (``path[:arg]``) in ``argv``, as ml_collections finds it."""
    for i, arg in enumerate(argv):
        if re.match(r"^-{1,2}config(=|$)", arg):
            return arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else None)
    return None


def _overrides(argv: Sequence[str]) -> list[str]:
    """The dotted keys of ``--config.x.y=...`` (and ``--noconfig.x.y``) in ``argv``."""
    return [arg.split("=", 1)[0].split(".", 1)[1] for arg in argv if re.match(r"-{1,2}(no)?config\.", arg)]


def _load(spec: str) -> mlc.ConfigDict:
    path, sep, arg = spec.partition(":")
    module = defaults.load_config_file(path)
    return module.get_config(arg) if sep else module.get_config()


def check_overrides(argv: Sequence[str]) -> None:
    """Refuse a missing config file, a ``ConfigError`` of its ``get_config`` (an unknown stage)
    and ``--config.x.y=`` overrides of keys the config does not have, naming the closest."""
    spec = _config_argument(argv)
    if not spec:
        return
    try:
        config = _load(spec)
    except FileNotFoundError as err:
        raise defaults.ConfigError(str(err)) from None
    except defaults.ConfigError as err:
        raise defaults.ConfigError(f"{spec}: {err}") from None
    for key in _overrides(argv):
        if defaults.config_node(config, key) is None and not _is_none_leaf(config, key):
            raise defaults.ConfigError(f"--config.{key}: " + defaults.unknown_key_message(key, config, spec))


def _is_none_leaf(config: mlc.ConfigDict, dotted: str) -> bool:
    section, _, leaf = dotted.rpartition(".")
    node = defaults.config_node(config, section)
    return isinstance(node, mlc.ConfigDict) and leaf in node and node[leaf] is None


def flag_error(err: Exception, argv: Sequence[str]) -> str:
    """One line for an error of the flag parser; a value it could not read names key, value and type."""
    text = " ".join(str(err).split())
    match = re.match(r"flag --config\.([\w.]+)=(.*?): (.*)$", text)
    spec = _config_argument(argv)
    if match and spec:
        key, value, why = match.groups()
        try:
            old = defaults.config_node(_load(spec), key)
        except Exception:  # noqa: BLE001 - the original message is still worth showing
            old = None
        if old is not None:
            return f"config key {key}={value}: expected {_kind(old)} like {old!r} ({why.strip('()')})"
    return text


def _kind(value: Any) -> str:
    if isinstance(value, tuple):
        inner = sorted({_kind(v).split(" ", 1)[1] + "s" for v in value})
        return f"a tuple of {len(value)} {'/'.join(inner) or 'items'}"
    name = {bool: "bool", int: "int", float: "float", str: "str"}.get(type(value), type(value).__name__)
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _fits(value: Any, want: Any) -> bool:
    if isinstance(want, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(want, bool)
    if isinstance(want, float):
        return isinstance(value, (int, float))
    if isinstance(want, tuple):
        return (isinstance(value, (tuple, list)) and len(value) == len(want)
                and all(_fits(v, w) for v, w in zip(value, want)))
    if want is None:
        return True
    return isinstance(value, type(want))


def check_types(config: mlc.ConfigDict, schema: mlc.ConfigDict | None = None, prefix: str = "") -> None:
    """Every value of ``config`` has the type of the schema's (an int stands for a float)."""
    schema = defaults.base() if schema is None else schema
    for key, value in config.items():
        if key not in schema:
            continue  # unknown keys are reported by validate
        name, want = f"{prefix}{key}", schema[key]
        if isinstance(want, mlc.ConfigDict):
            if not isinstance(value, mlc.ConfigDict):
                raise defaults.ConfigError(f"config key {name}={value!r}: expected a section ({', '.join(want)})")
            check_types(value, want, f"{name}.")
        elif not _fits(value, want):
            raise defaults.ConfigError(f"config key {name}={value!r}: expected {_kind(want)} like {want!r}")


def check_batch_sizes(config: mlc.ConfigDict, *, device_count: int | None = None,
                      process_count: int | None = None) -> None:
    """``data.batch_size`` and ``data.eval_batch_size`` (global) split evenly over the processes
    and over every device: each device takes the same share."""
    if device_count is None or process_count is None:
        import jax

        device_count = jax.device_count() if device_count is None else device_count
        process_count = jax.process_count() if process_count is None else process_count
    bad = [f"data.{k}={config.data[k]}" for k in ("batch_size", "eval_batch_size")
           if config.data[k] <= 0 or config.data[k] % process_count or config.data[k] % device_count]
    if bad:
        hosts = f"{process_count} process{'es' if process_count > 1 else ''}"
        raise defaults.ConfigError(
            f"{' and '.join(bad)} {'does' if len(bad) == 1 else 'do'} not divide over the {device_count} devices "
            f"({hosts}): every device takes an equal share of the global batch; use a multiple of {device_count}")


def _resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE)


def _has_checkpoints(workdir: Path) -> bool:
    ckpt = workdir / "checkpoints"
    return ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())


def check_resume(config: mlc.ConfigDict, workdir: str | Path) -> None:
    """A workdir with checkpoints is resumed only with the config that wrote them (its
    ``config.json``), up to the keys in ``RESUMABLE``. Keys one of the two lacks (a schema
    that grew since) are not compared."""
    workdir = Path(workdir)
    saved_file = workdir / "config.json"
    if not (saved_file.is_file() and _has_checkpoints(workdir)):
        return
    try:
        saved = dict(defaults.leaves(json.loads(saved_file.read_text())))
    except ValueError as err:
        raise defaults.ConfigError(f"{saved_file} cannot be read ({err}); it records the config of the "
                                   "checkpoints there: restore it, or use a new workdir") from None
    now = dict(defaults.leaves(json.loads(json.dumps(config.to_dict(), default=str))))
    changed = [f"{k}={saved[k]!r} there, {now[k]!r} now" for k in now
               if k in saved and not _resumable(k) and saved[k] != now[k]]
    if changed:
        raise defaults.ConfigError(
            f"{workdir} holds checkpoints of a run with another config: {'; '.join(changed)}. Resume with the "
            f"same values or use a new workdir (a resume may change only {', '.join(RESUMABLE)})")


def validate(config: mlc.ConfigDict) -> None:
    """Fail early, naming the key, on anything a run would otherwise trip over later: unknown keys
    (with the closest ones), wrong types, an unknown stage or dtype."""
    bad = defaults.unknown_keys(config)
    if bad:
        raise defaults.ConfigError(defaults.unknown_key_message(bad[0], defaults.base(),
                                                                "the schema (cpsl_jax/defaults.py)")
                                   + (f"; also unknown: {', '.join(bad[1:])}" if bad[1:] else ""))
    check_types(config)
    if config.stage not in defaults.STAGES:
        raise defaults.ConfigError(f"config key stage={config.stage!r} is not one of {defaults.STAGES}")
    if config.model.dtype not in ("float32", "bfloat16"):
        raise defaults.ConfigError(f"config key model.dtype={config.model.dtype!r}: use 'float32' or 'bfloat16'")
