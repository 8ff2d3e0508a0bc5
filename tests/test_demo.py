"""The end-to-end demo (configs/demo.py) shortened to a few steps per stage, with a narrower network
and 8 images per split: every stage runs in one process, chains its artifacts, and the demo writes
its table and pictures. (The full demo, and whether CPSL gains, is measured in the README, not here.)"""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cpsl_jax import defaults, demo
from cpsl_jax.data.pseudo_labels import PseudoLabelStore

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "demo.py")
SMALL = {"model.width": 8, "model.head_width": 32, "data.synthetic.length": 8, "data.eval_batch_size": 4}


def test_a_shortened_demo_runs_every_stage_and_writes_the_table_and_pictures(tmp_path):
    runs = tmp_path / "demo"
    summary = demo.run_demo(CONFIG, runs, overrides=SMALL, steps=2, pictures=2)
    module = demo.load_config_module(CONFIG)
    c = 19
    # Every stage ran, in order, and left its summary.
    for stage in module.STAGES:
        assert (runs / stage / "summary.json").exists(), stage
    for stage in ("source_only", "warmup", "self_training", "stage1", "stage2"):
        s = json.loads((runs / stage / "summary.json").read_text())
        assert s["step"] == 2 and (runs / stage / "model.msgpack").exists()
    # The artifacts chained between the stages.
    art = runs / "artifacts"
    soft = PseudoLabelStore(art / "soft")
    assert len(soft.names("soft")) == 8
    probs = soft.read_soft(soft.names("soft")[0]).astype(np.float32)
    assert probs.shape[0] == c and np.allclose(probs.sum(0), 1, atol=1e-2)
    prototypes, prior = np.load(art / "prototypes.npy"), np.load(art / "class_distribution.npy")
    assert prototypes.shape == (c, 32) and abs(prior.sum() - 1) < 1e-5
    hard = PseudoLabelStore(art / "hard_stage1")
    label, _ = hard.read_hard(hard.names("hard")[0], threshold=None)
    assert label.shape == (96, 192) and label.max() < c
    # The self-training baseline read the warm-up's hard labels (every target training image).
    assert len(PseudoLabelStore(art / "hard_warmup").names("hard")) == 8
    # The table: one row per reported model, with mIoU, rare-third mIoU and 19 per-class IoUs.
    rows = summary["rows"][0]
    assert list(rows) == list(module.REPORTED)
    assert list(rows) == ["source_only", "warmup", "self_training", "stage1", "stage2"]
    for row in rows.values():
        assert 0.0 <= row["miou"] <= 100.0 and len(row["per_class_iou"]) == c
        present = [v for v in row["per_class_iou"] if v is not None]
        assert abs(np.mean(present) - row["miou"]) < 1e-6  # mIoU is the mean over classes that occur
        # The second evaluation, with BatchNorm statistics re-estimated on the target images.
        assert 0.0 <= row["miou_target_stats"] <= 100.0 and 0.0 <= row["rare_miou_target_stats"] <= 100.0
    rare = summary["rare_classes"]
    assert 0 < len(rare) <= c // 3 + 1 and set(rare) <= set(summary["class_names"])
    table = (runs / "results.md").read_text()
    for title in module.REPORTED.values():
        assert f"| {title} |" in table
    models_table = table.split("## The benchmark")[0]
    assert models_table.count("\n| ") == 1 + len(module.REPORTED)  # the header and a row per model
    # The benchmark's measured properties: class frequencies of both training splits (in percent)
    # and the warm-up's pseudo labels class by class.
    props = summary["properties"][0]
    for key in ("source_frequency", "target_frequency"):
        assert len(props[key]) == c and abs(sum(props[key]) - 100) < 1e-6
    quality = props["warmup_pseudo_labels"]
    assert props["self_training_threshold"] == module.SELF_TRAINING_THRESHOLD
    for key in ("recall", "precision", "kept"):
        assert len(quality[key]) == c and all(v is None or 0 <= v <= 100 for v in quality[key])
    assert "| warm-up argmax right % |" in table and "| target pixels % |" in table
    assert "| mIoU, target BN stats |" in table
    source_row = next(line for line in table.splitlines() if line.startswith(f"| {module.REPORTED['source_only']} |"))
    assert len(source_row.strip("|").split("|")) == 4 + c  # title, mIoU, rare, target-stats mIoU, 19 classes
    # The picture: one row per image, input | ground truth | each reported model (2x upscaled).
    grid = np.asarray(Image.open(runs / "demo.png"))
    assert grid.shape[1] >= (2 + len(module.REPORTED)) * 192 * 2 and grid.shape[0] >= 2 * 96 * 2
    assert len(list((runs / "predictions").glob("*.png"))) == 2
    # Rerunning finds every stage done and only re-evaluates.
    again = demo.run_demo(CONFIG, runs, overrides=SMALL, steps=2, pictures=0, target_statistics=False)
    assert again["rows"][0]["stage1"]["miou"] == pytest.approx(rows["stage1"]["miou"])
    assert "miou_target_stats" not in again["rows"][0]["stage1"]
    assert "target BN stats" not in (runs / "results.md").read_text()


@pytest.mark.slow
def test_the_oracle_rows_run_end_to_end(tmp_path):
    """``--oracle``: the network trained on target labels, the ground truth written as soft
    labels, and stage 1 trained on them from the same warm-up, each a row of the table."""
    runs = tmp_path / "demo"
    summary = demo.run_demo(CONFIG, runs, overrides=SMALL, steps=2, pictures=0, oracle=True)
    module = demo.load_config_module(CONFIG)
    rows = summary["rows"][0]
    assert list(rows) == list(module.REPORTED) + list(module.ORACLE)
    for name in module.ORACLE:
        assert json.loads((runs / name / "summary.json").read_text())["step"] == 2
        assert 0.0 <= rows[name]["miou"] <= 100.0
    true_soft, soft = PseudoLabelStore(runs / "artifacts" / "soft_true"), PseudoLabelStore(runs / "artifacts" / "soft")
    assert true_soft.names("soft") == soft.names("soft")
    table = (runs / "results.md").read_text()
    assert all(f"| {title} |" in table for title in module.ORACLE.values())


def test_the_oracle_trains_the_source_only_network_on_target_labels():
    module = demo.load_config_module(CONFIG)
    source_only = demo.stage_config(module, "source_only", "runs/x", 0, {})
    oracle = demo.stage_config(module, "target_labels", "runs/x", 0, {"target_labels:optim.base_lr": "0.02"})
    assert oracle.data.source == oracle.data.target == "synthetic-target" and source_only.data.source == "synthetic-source"
    assert oracle.adv.weight == 0.0 and oracle.train.steps == source_only.train.steps and oracle.optim.base_lr == 0.02
    assert oracle.model.to_dict() == source_only.model.to_dict()
    # Stage 1 on true soft labels: the stage-1 config reading the ground-truth store, which the
    # soft-label tool writes from the target labels.
    stage1 = demo.stage_config(module, "stage1", "runs/x", 0, {})
    writer = demo.stage_config(module, "soft_labels_true", "runs/x", 0, {})
    true = demo.stage_config(module, "stage1_true_labels", "runs/x", 0, {})
    assert writer.stage == "soft_labels" and writer.data.soft_labels_from_ground_truth
    assert true.data.pseudo_labels == writer.data.pseudo_labels == "runs/x/artifacts/soft_true"
    true.data.pseudo_labels = stage1.data.pseudo_labels
    assert true.to_dict() == stage1.to_dict()
    assert list(module.ORACLE_STAGES) == ["target_labels", "soft_labels_true", "stage1_true_labels"]


def test_stage2_trains_on_the_flipped_crop_at_a_lower_rate():
    """The demo's stage 2 views its target crops with the strong view's ops, blur, jitter and
    cutout off: each view is the crop or its mirror image. Stage 1's strong view is untouched."""
    import jax
    from cpsl_jax.train import steps

    module = demo.load_config_module(CONFIG)
    stage1 = demo.stage_config(module, "stage1", "runs/x", 0, {})
    stage2 = demo.stage_config(module, "stage2", "runs/x", 0, {})
    assert stage2.optim.base_lr < stage1.optim.base_lr
    h, w = stage2.data.crop_size[1], stage2.data.crop_size[0]
    crops = np.random.default_rng(0).integers(0, 256, (8, h, w, 3)).astype(np.float32) / 255
    key = jax.random.PRNGKey(5)
    params, view = steps._strong_view(key, crops, stage2, None)
    flip = np.asarray(params.flip)
    expect = np.where(flip[:, None, None, None], crops[:, :, ::-1], crops)
    np.testing.assert_allclose(np.asarray(view), expect, atol=1 / 255)
    assert 0 < flip.sum() < 8
    _, strong = steps._strong_view(key, crops, stage1, None)
    assert np.abs(np.asarray(strong) - expect).mean() > 0.02


def test_demo_overrides_name_unknown_keys():
    module = demo.load_config_module(CONFIG)
    with pytest.raises(defaults.ConfigError, match="cpsl.sl_wieght"):
        demo.stage_config(module, "stage1", "runs/x", 0, {"cpsl.sl_wieght": "0.2"})
    config = demo.stage_config(module, "stage1", "runs/x", 3, {"cpsl.sl_weight": "0.2", "cpsl.rectify": "false",
                                                             "data.crop_size": "64,32"}, steps=5)
    assert config.cpsl.sl_weight == 0.2 and config.cpsl.rectify is False and config.data.crop_size == (64, 32)
    assert config.seed == 3 and config.train.steps == 5
    defaults.set_key(config, "data.crop_size", "(96, 48)")
    assert config.data.crop_size == (96, 48)
    with pytest.raises(defaults.ConfigError, match="optim.max_steps.*'many'"):
        defaults.set_key(config, "optim.max_steps", "many")
    with pytest.raises(defaults.ConfigError, match="'optim.max_steps.x'"):
        defaults.set_key(config, "optim.max_steps.x", 1)


def test_ablations_add_the_config_files_own_rows():
    """``--ablations`` runs the demo's generic rows and then the config file's, each the
    stage-1 config with only its overrides changed."""
    module = demo.load_config_module(CONFIG)
    rows = demo.ablations_of(module)
    assert list(rows) == list(demo.ABLATIONS) + list(module.ABLATIONS)
    stage1 = demo.stage_config(module, "stage1", "runs/x", 0, {}).to_dict()
    for name, (_, changes) in rows.items():
        ablated = demo.stage_config(module, "stage1", "runs/x", 0, changes).to_dict()
        changed = {f"cpsl.{k}" for k in ablated["cpsl"] if ablated["cpsl"][k] != stage1["cpsl"][k]}
        assert changed == set(changes), name
        assert {k: v for k, v in ablated.items() if k != "cpsl"} == {k: v for k, v in stage1.items() if k != "cpsl"}
    module.ABLATIONS = {"rce": ("again", {})}
    with pytest.raises(defaults.ConfigError, match="rce"):
        demo.ablations_of(module)
