"""Import and export of PyTorch checkpoints (the reference's format and bare ResNet weights).

Reference checkpoints (``*.pkl`` written by the official training script) are
``{'ResNet101': {'model_state': sd, 'prototypes_ema': (C, 256)}, 'FCDiscriminator': {...},
'iter': int, 'best_iou': float}``: one entry per network, keyed by its class name, each with
the same ``prototypes_ema`` tensor (zeros before stage 1); the warm-up files also carry the
discriminator. Bare state dicts (torchvision ImageNet ResNet-101, ``fc.*`` ignored; SimCLR-v2
conversions ``{'state_dict': sd}``) load into the backbone only and leave the head at its
fresh initialisation.

Names map mechanically: Flax ``layer3_5/conv2/kernel`` <-> PyTorch ``layer3.5.conv2.weight``
(``_<digits>`` <-> ``.<digits>``); conv kernels HWIO <-> OIHW, linear kernels (in, out) <->
(out, in); BatchNorm ``scale``/``bias`` <-> ``weight``/``bias`` and batch_stats
``mean``/``var`` <-> ``running_mean``/``running_var`` (both unbiased: a copy).

CLI::

    python -m cpsl_jax.convert import ckpt.pkl model.msgpack [--num-classes 19 --bn-pretrain ...]
    python -m cpsl_jax.convert export model.msgpack ckpt.pkl
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
from collections import OrderedDict
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util

from cpsl_jax.models import DeepLabV2, init_variables, variable_shapes

PathLike = str | os.PathLike
# Entries of the reference checkpoint: network class names as the training script writes them.
SEGMENTER_KEY = "ResNet101"
DISCRIMINATOR_KEY = "FCDiscriminator"
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


# ---------------------------------------------------------------------------- names and layouts
def torch_key(path: tuple[str, ...]) -> str:
    """PyTorch state-dict key of a Flax variable path (collection excluded).

    ``('layer3_5', 'conv2', 'kernel')`` -> ``'layer3.5.conv2.weight'``;
    ``('layer5', 'conv2d_list_1_0', 'bias')`` -> ``'layer5.conv2d_list.1.0.bias'``.
    """
    modules = [re.sub(r"_(\d+)", r".\1", p) for p in path[:-1]]
    return ".".join(modules + [_LEAF_TO_TORCH[path[-1]]])


def _to_flax_layout(x: np.ndarray) -> np.ndarray:
    if x.ndim == 4:  # conv OIHW -> HWIO
        return np.transpose(x, (2, 3, 1, 0))
    if x.ndim == 2:  # linear (out, in) -> (in, out)
        return x.T
    return x


def _to_torch_layout(x: np.ndarray) -> np.ndarray:
    if x.ndim == 4:
        return np.transpose(x, (3, 2, 0, 1))
    if x.ndim == 2:
        return x.T
    return x


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    return _to_torch_layout(np.empty(flax_shape, np.uint8)).shape


# ---------------------------------------------------------------------------- reading files
def _read_torch_file(path: PathLike, allow_pickle: bool) -> Any:
    """``torch.load`` on CPU; only tensors, containers and NumPy scalars unless ``allow_pickle``."""
    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    # Reference checkpoints store best_iou as a NumPy float64: allow just those globals.
    safe = [np._core.multiarray.scalar, np.dtype, np.dtypes.Float64DType, np.dtypes.Float32DType]
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, KeyError ... on bad files
        hint = "" if allow_pickle else " (if it is a trusted pickle with other objects, pass allow_pickle=True)"
        raise ValueError(f"{path}: not a readable PyTorch checkpoint: {type(e).__name__}: {str(e)[:200]}{hint}") from e


def _tensor_dict(sd: Any, where: str) -> dict[str, np.ndarray]:
    """State dict -> {name: float32/int NumPy array}, ``module.`` prefixes stripped."""
    if not isinstance(sd, Mapping) or not sd:
        raise ValueError(f"{where}: expected a non-empty state dict, got {type(sd).__name__}")
    out = {}
    for k, v in sd.items():
        if not hasattr(v, "detach") and not isinstance(v, np.ndarray):
            raise ValueError(f"{where}: entry {k!r} is a {type(v).__name__}, not a tensor")
        a = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
        if np.issubdtype(a.dtype, np.floating):
            a = a.astype(np.float32)
        out[k[len("module."):] if k.startswith("module.") else k] = a
    return out


def _split_checkpoint(obj: Any, where: str) -> dict[str, Any]:
    """Recognise the checkpoint layout and pull out its parts (NumPy arrays)."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: not a checkpoint (a {type(obj).__name__}, expected a dict)")
    parts: dict[str, Any] = {"prototypes": None, "discriminator": None, "iteration": None, "best_iou": None}
    if SEGMENTER_KEY in obj:
        entry = obj[SEGMENTER_KEY]
        if not isinstance(entry, Mapping) or "model_state" not in entry:
            raise ValueError(f"{where}: entry {SEGMENTER_KEY!r} has no 'model_state'")
        parts["model"] = _tensor_dict(entry["model_state"], f"{where}[{SEGMENTER_KEY!r}]['model_state']")
        protos = entry.get("prototypes_ema")
        if protos is not None:
            protos = np.asarray(protos.detach().cpu().numpy() if hasattr(protos, "detach") else protos, np.float32)
            # The script saves zeros before stage 1 trains prototypes: no prototypes.
            parts["prototypes"] = protos if np.any(protos) else None
        disc = obj.get(DISCRIMINATOR_KEY)
        if isinstance(disc, Mapping) and "model_state" in disc:
            parts["discriminator"] = _tensor_dict(disc["model_state"], f"{where}[{DISCRIMINATOR_KEY!r}]['model_state']")
        if obj.get("iter") is not None:
            parts["iteration"] = int(obj["iter"])
        if obj.get("best_iou") is not None:
            parts["best_iou"] = float(obj["best_iou"])
    elif "state_dict" in obj:  # SimCLR-v2 conversions and most training scripts
        parts["model"] = _tensor_dict(obj["state_dict"], f"{where}['state_dict']")
    elif "model_state" in obj:
        parts["model"] = _tensor_dict(obj["model_state"], f"{where}['model_state']")
    else:
        parts["model"] = _tensor_dict(obj, where)
    return parts


# ---------------------------------------------------------------------------- import
@functools.lru_cache(maxsize=8)
def _variable_shapes(num_classes: int, bn_pretrain: bool, depth: int, width: int, head_width: int) -> dict:
    model = DeepLabV2(num_classes=num_classes, depth=depth, bn_pretrain=bn_pretrain, width=width, head_width=head_width)
    shapes = variable_shapes(model)
    return {col: traverse_util.flatten_dict(dict(shapes[col])) for col in ("params", "batch_stats")}


def _fresh_variables(model: DeepLabV2, rng: jax.Array) -> dict:
    v = init_variables(model, rng)
    return {col: traverse_util.flatten_dict(jax.device_get(dict(v[col]))) for col in ("params", "batch_stats")}


def discriminator_from_state_dict(sd: Mapping[str, Any]) -> dict:
    """``FCDiscriminator`` state dict -> ``{'params': ...}`` for :class:`cpsl_jax.models.Discriminator`."""
    sd = _tensor_dict(sd, "discriminator state dict")
    flat = {}
    for k, v in sd.items():
        module, leaf = k.rsplit(".", 1)
        flat[(module, "kernel" if leaf == "weight" else leaf)] = jnp.asarray(_to_flax_layout(v))
    return {"params": traverse_util.unflatten_dict(flat)}


def load_torch_checkpoint(
    path_or_state_dict: PathLike | Mapping[str, Any],
    *,
    num_classes: int = 19,
    bn_pretrain: bool = False,
    depth: int = 101,
    width: int = 64,
    head_width: int = 256,
    strict: bool = False,
    rng: jax.Array | None = None,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """Read a reference checkpoint or a bare ResNet state dict into :class:`DeepLabV2` variables.

    Args:
      path_or_state_dict: a ``.pkl``/``.pth`` file or an already loaded dict.
      num_classes, bn_pretrain, depth, width, head_width: the model the weights are for.
      strict: raise when a model tensor is missing or a checkpoint tensor is unused.
      rng: key of the fresh initialisation of missing tensors (default ``PRNGKey(0)``).
      allow_pickle: let ``torch.load`` unpickle arbitrary objects (trusted files only).

    Returns:
      ``{'variables': {'params', 'batch_stats'}, 'prototypes': (C, head_width) array or None
      (absent or all zero), 'discriminator': {'params'} or None, 'iteration': int | None,
      'best_iou': float | None, 'missing': [torch keys left at fresh init],
      'unexpected': [checkpoint keys not used]}``. ``num_batches_tracked`` buffers and a
      torchvision ``fc.*`` classifier are skipped silently.

    Raises:
      ValueError: the file is not a checkpoint (the message names it), or a tensor's shape
        differs from the model's (the message names the tensor and both shapes).
    """
    where = "state dict" if isinstance(path_or_state_dict, Mapping) else os.fspath(path_or_state_dict)
    obj = path_or_state_dict if isinstance(path_or_state_dict, Mapping) else _read_torch_file(path_or_state_dict, allow_pickle)
    parts = _split_checkpoint(obj, where)
    sd: dict[str, np.ndarray] = parts["model"]
    expected = _variable_shapes(num_classes, bn_pretrain, depth, width, head_width)

    flat: dict[str, dict] = {"params": {}, "batch_stats": {}}
    missing, used = [], set()
    for col, leaves in expected.items():
        for path, spec in leaves.items():
            key = torch_key(path)
            if key not in sd:
                missing.append(key)
                continue
            value = _to_flax_layout(sd[key])
            if value.shape != tuple(spec.shape):
                raise ValueError(
                    f"{where}: tensor {key!r} has shape {tuple(sd[key].shape)} but the model "
                    f"(num_classes={num_classes}, depth={depth}, width={width}, head_width={head_width}, "
                    f"bn_pretrain={bn_pretrain}) expects {_torch_shape(tuple(spec.shape))}"
                )
            flat[col][path] = jnp.asarray(value, jnp.float32)
            used.add(key)
    ignored = lambda k: k.endswith("num_batches_tracked") or k.startswith("fc.")  # noqa: E731
    unexpected = sorted(k for k in sd if k not in used and not ignored(k))
    if strict and (missing or unexpected):
        raise ValueError(f"{where}: missing tensors {missing[:10]}..., unexpected tensors {unexpected[:10]}...")
    if missing:
        model = DeepLabV2(num_classes=num_classes, depth=depth, bn_pretrain=bn_pretrain, width=width, head_width=head_width)
        fresh = _fresh_variables(model, jax.random.PRNGKey(0) if rng is None else rng)
        for col in flat:
            for path, value in fresh[col].items():
                flat[col].setdefault(path, jnp.asarray(value))
    variables = {col: traverse_util.unflatten_dict(flat[col]) for col in flat}
    disc = parts["discriminator"]
    return {
        "variables": variables,
        "prototypes": None if parts["prototypes"] is None else jnp.asarray(parts["prototypes"]),
        "discriminator": None if disc is None else discriminator_from_state_dict(disc),
        "iteration": parts["iteration"],
        "best_iou": parts["best_iou"],
        "missing": missing,
        "unexpected": unexpected,
    }


# ---------------------------------------------------------------------------- export
def to_torch_state_dict(variables: Mapping[str, Any]) -> "OrderedDict[str, Any]":
    """Flax ``{'params', 'batch_stats'}`` -> PyTorch state dict (float32 tensors, CPU).

    Every BatchNorm also gets ``num_batches_tracked = 0`` (unused by the reference, whose
    momentum is fixed, but required by a strict ``load_state_dict``).
    """
    import torch

    sd: OrderedDict[str, Any] = OrderedDict()
    for col in ("params", "batch_stats"):
        for path, value in traverse_util.flatten_dict(dict(variables.get(col, {}))).items():
            arr = np.ascontiguousarray(_to_torch_layout(np.asarray(jax.device_get(value), np.float32)))
            sd[torch_key(path)] = torch.from_numpy(arr.copy())
            if col == "batch_stats" and path[-1] == "mean":
                prefix = torch_key(path).rsplit(".", 1)[0]
                sd[f"{prefix}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return sd


def save_torch_checkpoint(
    variables: Mapping[str, Any],
    path: PathLike,
    *,
    prototypes: Any = None,
    iteration: int = 0,
    best_iou: float = 0.0,
    discriminator: Mapping[str, Any] | None = None,
) -> None:
    """Write ``variables`` in the reference format, loadable by the official code.

    ``prototypes`` (C, D) is stored as every entry's ``prototypes_ema`` (zeros when None, as
    the reference writes before stage 1); ``discriminator`` (``{'params'}`` of
    :class:`cpsl_jax.models.Discriminator`) adds the warm-up's ``FCDiscriminator`` entry.
    """
    import torch

    sd = to_torch_state_dict(variables)
    if prototypes is None:
        num_classes, dim = sd["layer5.head.1.weight"].shape[:2]
        prototypes = np.zeros((num_classes, dim), np.float32)
    protos = torch.from_numpy(np.array(jax.device_get(prototypes), np.float32))
    state: dict[str, Any] = {SEGMENTER_KEY: {"model_state": sd, "prototypes_ema": protos}}
    if discriminator is not None:
        state[DISCRIMINATOR_KEY] = {"model_state": to_torch_state_dict(discriminator), "prototypes_ema": protos}
    state["iter"] = int(iteration)
    state["best_iou"] = float(best_iou)
    torch.save(state, os.fspath(path))


# ---------------------------------------------------------------------------- CLI
def _msgpack_save(path: PathLike, payload: dict) -> None:
    payload = {k: v for k, v in payload.items() if v is not None}
    with open(path, "wb") as f:
        f.write(serialization.msgpack_serialize(jax.device_get(payload)))


def _msgpack_load(path: PathLike) -> dict:
    with open(path, "rb") as f:
        return serialization.msgpack_restore(f.read())


def main(argv: list[str] | None = None) -> int:
    """``python -m cpsl_jax.convert {import,export}``; see ``--help``."""
    parser = argparse.ArgumentParser(prog="python -m cpsl_jax.convert", description="Convert CPSL checkpoints between PyTorch and Flax.")
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="PyTorch checkpoint (.pkl/.pth) -> Flax msgpack")
    imp.add_argument("src")
    imp.add_argument("dst")
    imp.add_argument("--num-classes", type=int, default=19)
    imp.add_argument("--depth", type=int, default=101)
    imp.add_argument("--width", type=int, default=64)
    imp.add_argument("--head-width", type=int, default=256)
    imp.add_argument("--bn-pretrain", action="store_true")
    imp.add_argument("--strict", action="store_true", help="fail on missing or unexpected tensors")
    exp = sub.add_parser("export", help="Flax msgpack (written by 'import' or the trainer) -> reference .pkl")
    exp.add_argument("src")
    exp.add_argument("dst")
    args = parser.parse_args(argv)
    if args.command == "import":
        ck = load_torch_checkpoint(
            args.src, num_classes=args.num_classes, depth=args.depth, width=args.width,
            head_width=args.head_width, bn_pretrain=args.bn_pretrain, strict=args.strict,
        )
        _msgpack_save(args.dst, {k: ck[k] for k in ("variables", "prototypes", "discriminator", "iteration", "best_iou")})
        print(f"wrote {args.dst}; missing {len(ck['missing'])} tensors, unexpected {len(ck['unexpected'])}")
        for k in ck["missing"] + ck["unexpected"]:
            print("  ", k)
    else:
        payload = _msgpack_load(args.src)
        if "variables" not in payload:
            raise SystemExit(f"{args.src}: no 'variables' entry; not written by 'import'")
        save_torch_checkpoint(
            payload["variables"], args.dst, prototypes=payload.get("prototypes"),
            iteration=int(payload.get("iteration", 0)), best_iou=float(payload.get("best_iou", 0.0)),
            discriminator=payload.get("discriminator"),
        )
        print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
