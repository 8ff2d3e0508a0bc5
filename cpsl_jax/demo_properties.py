"""What the demo's benchmark is, measured by the demo itself: the properties a study rests on.

* class frequencies of the source and target training splits (pixels, ignore excluded), next
  to the Cityscapes distribution the target is designed after;
* the warm-up's pseudo labels on the target training images, class by class: how many of a
  class's pixels its argmax gets right (recall, all pixels), and of the pixels kept above the
  self-training threshold, how many are right (precision) and how many are kept;
* the gap that normalisation does not close: the oracle (trained on target labels) against the
  source-only model re-normalised on the target (AdaBN), when ``--oracle`` ran.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cpsl_jax.data import layouts


def pseudo_label_quality(dataset, store_path: str | Path, threshold: float, num_classes: int) -> dict[str, list]:
    """Per class, in percent: ``recall`` of the argmax over all pixels of the class, ``precision``
    and ``kept`` (share of the class's pixels) of the labels above ``threshold``."""
    from cpsl_jax.data.pseudo_labels import PseudoLabelStore, threshold_hard

    store = PseudoLabelStore(store_path)
    hit, total = np.zeros(num_classes), np.zeros(num_classes)
    kept_right, kept_pred, kept_true = np.zeros(num_classes), np.zeros(num_classes), np.zeros(num_classes)
    for i in range(len(dataset)):
        item = dataset[i]
        truth = np.asarray(item["label"])
        label, conf = store.read_hard(item["name"], threshold=None)
        if label.shape != truth.shape:
            raise ValueError(f"{store_path}: pseudo label of {item['name']} is {label.shape}, its image {truth.shape}")
        valid = truth < num_classes
        kept = valid & (threshold_hard(label, conf, threshold) != 255)
        t, p = truth[valid], label[valid]
        total += np.bincount(t, minlength=num_classes)[:num_classes]
        hit += np.bincount(t[t == p], minlength=num_classes)[:num_classes]
        tk, pk = truth[kept], label[kept]
        kept_true += np.bincount(tk, minlength=num_classes)[:num_classes]
        kept_pred += np.bincount(pk[pk < num_classes], minlength=num_classes)[:num_classes]
        kept_right += np.bincount(tk[tk == pk], minlength=num_classes)[:num_classes]

    def pct(a, b):
        return [None if d == 0 else 100.0 * float(n) / float(d) for n, d in zip(a, b)]

    return {"recall": pct(hit, total), "precision": pct(kept_right, kept_pred), "kept": pct(kept_true, total)}


def measure(configs: dict[str, Any], runs: Path, rows: dict[str, dict], threshold: float | None) -> dict[str, Any]:
    """The properties of the benchmark the demo ran, from its configs, artifacts and result rows."""
    from cpsl_jax.train.io import open_split

    config = next(iter(configs.values()))
    c = config.model.num_classes
    source, target = open_split(config, "source", "train"), open_split(config, "target", "train")

    def frequency(ds) -> list[float]:
        return (100 * layouts.class_frequencies((ds[i]["label"] for i in range(len(ds))), c)).tolist()

    out: dict[str, Any] = {"source_frequency": frequency(source), "target_frequency": frequency(target)}
    store = runs / "artifacts" / "hard_warmup"
    if threshold is not None and store.is_dir():
        out["warmup_pseudo_labels"] = pseudo_label_quality(target, store, threshold, c)
        out["self_training_threshold"] = threshold
    if "target_labels" in rows and "source_only" in rows and "miou_target_stats" in rows["source_only"]:
        out["oracle_minus_source_only_adabn"] = rows["target_labels"]["miou"] - rows["source_only"]["miou_target_stats"]
    return out


def _cell(v) -> str:
    return "—" if v is None else f"{v:.1f}" if v >= 0.95 or v == 0 else f"{v:.2f}"


def table(props: dict[str, Any], names: Sequence[str]) -> str:
    """Markdown: one column a class; frequencies and the warm-up's pseudo-label quality."""
    lines = ["| | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    reference = tuple(layouts.CLASS_NAMES_19) == tuple(names)
    rows = [("source pixels %", props["source_frequency"]), ("target pixels %", props["target_frequency"])]
    if reference:
        from cpsl_jax.synthetic.v2 import CITYSCAPES_DISTRIBUTION

        rows.append(("Cityscapes pixels % (v2's design)", [100 * v for v in CITYSCAPES_DISTRIBUTION]))
    quality = props.get("warmup_pseudo_labels")
    if quality:
        thr = props["self_training_threshold"]
        rows += [("warm-up argmax right %", quality["recall"]),
                 (f"kept above {thr} %", quality["kept"]), ("right of kept %", quality["precision"])]
    for title, values in rows:
        lines.append(f"| {title} | " + " | ".join(_cell(v) for v in values) + " |")
    text = "\n".join(lines)
    if "oracle_minus_source_only_adabn" in props:
        text += (f"\n\nOracle minus source-only re-normalised on the target (AdaBN): "
                 f"{props['oracle_minus_source_only_adabn']:.1f} mIoU.")
    return text
