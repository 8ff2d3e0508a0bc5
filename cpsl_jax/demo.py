"""The end-to-end demo on the built-in synthetic domains: every stage, one command, a table.

    python -m cpsl_jax.demo --config=configs/demo.py --workdir=runs/demo
    python -m cpsl_jax.demo --config=configs/demo.py --workdir=runs/study --seeds=0,1,2 --ablations

The config file names its stages (``STAGES``), the ones to report (``REPORTED``) and gives
each stage's config through ``get_config("STAGE,RUNS")``, as ``launch/pipeline.sh`` runs a
task config stage after stage; here they run in one process, so imports and compiled
programs are shared, and JAX's persistent compilation cache keeps them for the next run. A
stage whose ``summary.json`` exists is skipped, so an interrupted demo continues where it
stopped.

Afterwards every reported model is evaluated on the target val split and the demo writes
``<workdir>/results.json`` and ``<workdir>/results.md`` (target mIoU, the mIoU of the
rarest third of the classes and per-class IoU after each stage, and the mIoU of the same
model with its BatchNorm statistics re-estimated on the target training images, the AdaBN
baseline: what normalisation alone accounts for) and ``<workdir>/demo.png``
(one row per val image: input | ground truth | each reported model, and a colour key). With
several seeds each runs in ``<workdir>/seed<N>``; ``--ablations`` adds stage-1 runs with one
CPSL component switched off, or the paper's reverse cross-entropy switched back on
(``ABLATIONS``; a config file may add its own), that share the seed's warm-up and pseudo
labels; ``--oracle`` adds the config's ``ORACLE`` rows (running its ``ORACLE_STAGES``),
ceilings measured with the target's labels.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cpsl_jax import defaults, demo_properties, visualize
from cpsl_jax.data import layouts

log = logging.getLogger("cpsl_jax.demo")

# Stage-1 ablations of every config: name -> (title, config overrides). A config file may add
# its own (its ``ABLATIONS``, e.g. undoing one of its departures from the paper).
ABLATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "uniform_prior": ("no class balance (uniform Sinkhorn prior)", {"cpsl.class_balanced": False}),
    "no_rectification": ("no prototype rectification", {"cpsl.rectify": False}),
    "no_consistency": ("no consistency loss", {"cpsl.consistency_weight": 0.0}),
    "no_contrastive": ("no contrastive term", {"cpsl.contrastive_weight": 0.0}),
    "rce": ("with reverse cross-entropy (the paper's stage-1 target loss)", {"cpsl.rce": True}),
}
SHORT_NAMES = {"sidewalk": "sidew.", "building": "build.", "traffic_light": "light", "traffic_sign": "sign",
               "vegetation": "veget.", "terrain": "terr.", "person": "pers.", "motorcycle": "motor.",
               "bicycle": "bike"}
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "cpsl_jax", "jax")


def load_config_module(path: str):
    """The demo config file as a module (its ``get_config``, ``STAGES``, ``REPORTED``)."""
    module = defaults.load_config_file(path)
    for name in ("STAGES", "REPORTED"):
        if not hasattr(module, name):
            raise defaults.ConfigError(f"{path} defines no {name} (a demo config needs get_config, STAGES and "
                                       "REPORTED)")
    return module


def ablations_of(module) -> dict[str, tuple[str, dict[str, Any]]]:
    """The stage-1 ablations ``--ablations`` runs for a config file: ours, then the file's."""
    extra = getattr(module, "ABLATIONS", {})
    clash = sorted(set(extra) & set(ABLATIONS))
    if clash:
        raise defaults.ConfigError(f"{module.__file__}: ABLATIONS {clash} shadow the demo's own ablations")
    return {**ABLATIONS, **extra}


def stage_config(module, stage: str, runs: str | Path, seed: int, overrides: dict[str, Any],
                 steps: int = 0):
    """The config of one demo stage: the file's, with the seed, the overrides and a step cap."""
    config = module.get_config(f"{stage},{runs}")
    config.seed = seed
    for key, value in overrides.items():
        only, sep, key = key.rpartition(":")  # 'stage1:optim.base_lr' changes stage 1 only
        known = (*module.STAGES, *getattr(module, "ORACLE", ()), *getattr(module, "ORACLE_STAGES", ()))
        if sep and only not in known:
            raise defaults.ConfigError(f"override {only}:{key}: {only!r} is not a stage of the demo "
                                       f"({', '.join(known)})")
        if not sep or only == stage:
            defaults.set_key(config, key, value)
    if steps and config.stage in defaults.TRAINING_STAGES:
        config.train.steps = min(config.train.steps, steps)
        config.train.checkpoint_every = min(config.train.checkpoint_every, steps)
    return config


def run_stage(config, workdir: Path) -> dict:
    """Run one stage unless its ``summary.json`` is there; returns the summary."""
    from cpsl_jax import main

    summary_file = workdir / "summary.json"
    if summary_file.exists():
        log.info("%s: done already (%s)", workdir.name, summary_file)
        return json.loads(summary_file.read_text())
    t0 = time.perf_counter()
    log.info("== %s -> %s", workdir.name, workdir)
    out = main.run(config, str(workdir))
    log.info("== %s finished in %.0f s", workdir.name, time.perf_counter() - t0)
    return out


def _model_file(workdir: Path) -> Path:
    return workdir / "model.msgpack"


def load_models(configs: dict[str, Any], workdirs: dict[str, Path]) -> dict[str, dict]:
    """Each stage's final model variables (``model.msgpack`` in its folder)."""
    from cpsl_jax.train.io import load_variables

    return {name: load_variables(config, str(_model_file(workdirs[name])))["variables"]
            for name, config in configs.items()}


def evaluate_models(configs: dict[str, Any], variables: dict[str, dict], *,
                    target_statistics: bool = False) -> dict[str, dict]:
    """Target val confusion matrix and IoUs of each stage's final model.

    With ``target_statistics`` each model is evaluated a second time with its BatchNorm
    statistics re-estimated on the target training images (``tools.target_statistics``, the
    AdaBN baseline): ``miou_target_stats`` and ``per_class_iou_target_stats``.
    """
    from cpsl_jax import tools
    from cpsl_jax.train import parallel
    from cpsl_jax.train.io import open_split
    from cpsl_jax.train.loop import evaluate_variables

    mesh = parallel.make_mesh()
    splits: dict[tuple[str, str], Any] = {}  # the stages share their data: draw or read it once

    def split(config, name):
        key = (json.dumps(config.data.to_dict(), sort_keys=True, default=str), name)
        if key not in splits:
            splits[key] = open_split(config, "target", name)
        return splits[key]

    out = {}
    for name, config in configs.items():
        val = split(config, "val")
        result = evaluate_variables(config, variables[name], val, mesh)
        out[name] = {"miou": float(result["miou"]), "per_class_iou": np.asarray(result["per_class_iou"], float),
                     "pixel_accuracy": float(result["pixel_accuracy"]),
                     "confusion_matrix": np.asarray(result["confusion_matrix"])}
        if target_statistics:
            stats, _ = tools.target_statistics(config, variables[name], mesh, split(config, "train"))
            adapted = evaluate_variables(config, {**variables[name], "batch_stats": stats}, val, mesh)
            out[name]["miou_target_stats"] = float(adapted["miou"])
            out[name]["per_class_iou_target_stats"] = np.asarray(adapted["per_class_iou"], float)
            log.info("%s: target mIoU %.2f (with target BatchNorm statistics %.2f)", name, 100 * out[name]["miou"],
                     100 * out[name]["miou_target_stats"])
        else:
            log.info("%s: target mIoU %.2f", name, 100 * out[name]["miou"])
    return out


def rarest_third(confusion: np.ndarray) -> list[int]:
    """The third (rounded up) of the classes present in the ground truth with the fewest pixels."""
    counts = np.asarray(confusion).sum(axis=1)
    present = [int(i) for i in np.argsort(counts, kind="stable") if counts[i] > 0]
    return sorted(present[:math.ceil(len(present) / 3)])


def _nanmean(x) -> float:
    x = np.asarray(x, float)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def summarise(results: dict[str, dict], rare: Sequence[int]) -> dict[str, dict]:
    """JSON-ready rows: mIoU, rare-third mIoU and per-class IoU (percent)."""
    def row(r):
        out = {"miou": 100 * r["miou"], "rare_miou": 100 * _nanmean(r["per_class_iou"][list(rare)]),
               "pixel_accuracy": 100 * r["pixel_accuracy"],
               "per_class_iou": [None if not np.isfinite(v) else 100 * float(v) for v in r["per_class_iou"]]}
        if "miou_target_stats" in r:
            out["miou_target_stats"] = 100 * r["miou_target_stats"]
            out["rare_miou_target_stats"] = 100 * _nanmean(r["per_class_iou_target_stats"][list(rare)])
        return out

    return {name: row(r) for name, r in results.items()}


def _fmt(v) -> str:
    return "—" if v is None or not np.isfinite(v) else f"{v:.1f}"


def stage_table(rows: dict[str, dict], titles: dict[str, str], names: Sequence[str], rare: Sequence[int]) -> str:
    """Markdown: one row per model, mIoU, rare-third mIoU and per-class IoU."""
    short = [SHORT_NAMES.get(n, n) + ("*" if i in rare else "") for i, n in enumerate(names)]
    adapted = any("miou_target_stats" in row for row in rows.values())
    extra = ["mIoU, target BN stats"] if adapted else []
    head = "| model | mIoU | rare mIoU | " + " | ".join(extra + short) + " |"
    lines = [head, "|" + "---|" * (3 + len(extra) + len(names))]
    for name, row in rows.items():
        cells = [titles.get(name, name), _fmt(row["miou"]), _fmt(row["rare_miou"])]
        cells += [_fmt(row.get("miou_target_stats"))] if adapted else []
        cells += [_fmt(v) for v in row["per_class_iou"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Target val IoU (%). `*`: the rarest third of the classes in the val ground truth "
                 "(rare mIoU averages them).")
    if adapted:
        lines.append("\"Target BN stats\": the same model with its BatchNorm statistics re-estimated on the "
                     "target training images (AdaBN): what normalisation alone accounts for.")
    return "\n".join(lines)


def study_table(per_seed: dict[int, dict[str, dict]], titles: dict[str, str], key: str) -> str:
    """Markdown: one row per model, one column per seed and the mean, for ``key``."""
    seeds = sorted(per_seed)
    names = list(per_seed[seeds[0]])
    lines = ["| model | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
             "|" + "---|" * (len(seeds) + 2)]
    for name in names:
        vals = [per_seed[s][name][key] if name in per_seed[s] else float("nan") for s in seeds]
        lines.append(f"| {titles.get(name, name)} | " + " | ".join(_fmt(v) for v in vals) +
                     f" | {_fmt(_nanmean(vals))} |")
    return "\n".join(lines)


def prediction_panels(configs: dict[str, Any], variables: dict[str, dict], titles: dict[str, str], count: int,
                      out_dir: Path, scale: int = 2) -> Path | None:
    """``count`` val images, one row each: input | ground truth | each model; returns the grid PNG."""
    if count <= 0:
        return None
    import jax.numpy as jnp

    from cpsl_jax import evaluate
    from cpsl_jax.train import state as state_lib
    from cpsl_jax.train.io import open_split

    first = next(iter(configs.values()))
    num_classes = first.model.num_classes
    colors = visualize.palette(num_classes)
    val = open_split(first, "target", "val")
    items = [val[i] for i in range(min(count, len(val)))]
    preds: dict[str, list[np.ndarray]] = {}
    for name, config in configs.items():
        predict = evaluate.full_res_predictor(state_lib.build_model(config, axis_name=None))
        preds[name] = [np.asarray(predict(variables[name], jnp.asarray(it["image"], jnp.float32) / 255.0))
                       for it in items]

    def big(a):
        return np.repeat(np.repeat(a, scale, axis=0), scale, axis=1)

    rows = []
    for i, it in enumerate(items):
        panels = [big(it["image"]), big(visualize.colorize(it["label"], colors))]
        panels += [big(visualize.colorize(preds[n][i], colors)) for n in configs]
        row = visualize.side_by_side(panels, titles=["input", "ground truth"] + [titles.get(n, n) for n in configs])
        visualize.save_png(str(out_dir / "predictions" / f"{it['name']}.png"), row)
        rows.append(row)
    key = legend(num_classes)
    key = np.pad(key, ((0, 0), (0, max(0, rows[0].shape[1] - key.shape[1])), (0, 0)), constant_values=255)
    rows.append(key[:, :rows[0].shape[1]])
    grid = np.concatenate([np.pad(r, ((0, 4), (0, 0), (0, 0)), constant_values=255) for r in rows], axis=0)
    path = out_dir / "demo.png"
    visualize.save_png(str(path), grid)
    return path


def legend(num_classes: int, swatch: int = 12) -> np.ndarray:
    """A strip with each class colour and name (for the picture)."""
    from PIL import Image, ImageDraw

    names, colors = layouts.class_names(num_classes), visualize.palette(num_classes)
    per_row = 10
    rows = math.ceil(num_classes / per_row)
    img = Image.new("RGB", (per_row * 100, rows * (swatch + 4) + 2), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for i, (n, c) in enumerate(zip(names, colors)):
        x, y = (i % per_row) * 100 + 2, (i // per_row) * (swatch + 4) + 2
        draw.rectangle([x, y, x + swatch, y + swatch], fill=tuple(int(v) for v in c))
        draw.text((x + swatch + 3, y), n, fill=(0, 0, 0))
    return np.asarray(img)


def run_demo(config_path: str, workdir: str | Path, *, seeds: Sequence[int] = (0,), ablations: bool = False,
             oracle: bool = False, overrides: dict[str, Any] | None = None, steps: int = 0,
             pictures: int = 4, target_statistics: bool = True) -> dict:
    """Run the demo (every seed, optional ablations and oracle), evaluate, and write the tables
    and pictures. ``target_statistics``: also evaluate every model with its BatchNorm
    statistics re-estimated on the target training images (a column of the tables)."""
    from cpsl_jax.train.logger import setup_logging

    module = load_config_module(config_path)
    if oracle and not getattr(module, "ORACLE", None):
        raise defaults.ConfigError(f"{config_path} defines no ORACLE stage for --oracle")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    overrides = dict(overrides or {})
    titles = dict(module.REPORTED)
    rows = ablations_of(module)
    titles.update({f"stage1_{k}": f"stage 1, {t}" for k, (t, _) in rows.items()})
    if oracle:
        titles.update(module.ORACLE)
    t_start = time.perf_counter()
    per_seed: dict[int, dict[str, dict]] = {}
    properties: dict[int, dict[str, Any]] = {}
    first_seed_runs = None
    rare: list[int] = []
    names: Sequence[str] = ()
    for seed in seeds:
        runs = workdir if len(seeds) == 1 else workdir / f"seed{seed}"
        first_seed_runs = first_seed_runs or runs
        configs, workdirs = {}, {}
        for stage in module.STAGES:
            config = stage_config(module, stage, runs, seed, overrides, steps)
            run_stage(config, runs / stage)
            if stage in module.REPORTED:
                configs[stage], workdirs[stage] = config, runs / stage
        if ablations:
            for key, (_, changes) in rows.items():
                config = stage_config(module, "stage1", runs, seed, {**overrides, **changes}, steps)
                name = f"stage1_{key}"
                run_stage(config, runs / name)
                configs[name], workdirs[name] = config, runs / name
        for name in getattr(module, "ORACLE_STAGES", module.ORACLE) if oracle else ():
            config = stage_config(module, name, runs, seed, overrides, steps)
            run_stage(config, runs / name)
            if name in module.ORACLE:
                configs[name], workdirs[name] = config, runs / name
        setup_logging(workdir)
        variables = load_models(configs, workdirs)
        results = evaluate_models(configs, variables, target_statistics=target_statistics)
        if not rare:
            rare = rarest_third(next(iter(results.values()))["confusion_matrix"])
            names = layouts.class_names(next(iter(configs.values())).model.num_classes)
        per_seed[seed] = summarise(results, rare)
        threshold = configs["self_training"].data.confidence_threshold if "self_training" in configs else None
        properties[seed] = demo_properties.measure(configs, runs, per_seed[seed], threshold)
        (runs / "results.json").write_text(json.dumps({"seed": seed, "rows": per_seed[seed],
                                                       "properties": properties[seed]}, indent=1) + "\n")
        if seed == seeds[0]:
            shown = {k: configs[k] for k in module.REPORTED if k in configs}
            prediction_panels(shown, variables, titles, pictures, workdir)
    minutes = (time.perf_counter() - t_start) / 60
    text = [f"# CPSL demo: synthetic source -> synthetic target ({', '.join(map(str, seeds))})", ""]
    for seed in seeds:
        text += [f"## Seed {seed}", "", stage_table(per_seed[seed], titles, names, rare), ""]
    if len(seeds) > 1 or ablations:
        text += ["## Target mIoU by seed", "", study_table(per_seed, titles, "miou"), "",
                 "## Rarest-third mIoU by seed", "", study_table(per_seed, titles, "rare_miou"), ""]
        if target_statistics:
            text += ["## Target mIoU with target BatchNorm statistics (AdaBN), by seed", "",
                     study_table(per_seed, titles, "miou_target_stats"), ""]
    text += [f"## The benchmark, measured (seed {seeds[0]})", "", demo_properties.table(properties[seeds[0]], names), ""]
    text.append(f"Wall time {minutes:.1f} min (this run; stages found done were not rerun).")
    report = "\n".join(text) + "\n"
    (workdir / "results.md").write_text(report)
    summary = {"seeds": list(seeds), "rare_classes": [names[i] for i in rare], "rows": per_seed,
               "properties": properties,
               "class_names": list(names), "minutes": minutes}
    (workdir / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(report, flush=True)
    return summary


def _parse_overrides(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.py", help="demo config file (configs/demo.py)")
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds (data stay the same)")
    p.add_argument("--ablations", action="store_true", help="also run stage 1 without each CPSL component (and with RCE)")
    p.add_argument("--oracle", action="store_true",
                   help="also train the source-only network on the target's labels (the config's ORACLE)")
    p.add_argument("--steps", type=int, default=0, help="cap every training stage at this many steps (tests)")
    p.add_argument("--pictures", type=int, default=4, help="val images shown in demo.png")
    p.add_argument("--no-target-stats", action="store_true",
                   help="skip the second evaluation of every model with BatchNorm statistics re-estimated on "
                        "the target training images")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key in every stage (--set cpsl.sl_weight=0.2) or in one "
                        "(--set stage1:optim.base_lr=1e-3)")
    a = p.parse_args(argv)
    from cpsl_jax.train.logger import setup_logging

    import jax

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", DEFAULT_CACHE)
    setup_logging(a.workdir)
    try:
        run_demo(a.config, a.workdir, seeds=[int(s) for s in a.seeds.split(",") if s.strip()],
                 ablations=a.ablations, oracle=a.oracle, overrides=_parse_overrides(a.set), steps=a.steps,
                 pictures=a.pictures, target_statistics=not a.no_target_stats)
    except (defaults.ConfigError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
