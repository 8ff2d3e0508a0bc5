"""The system end to end on the tiny config: CLI errors, exact resume, every stage's artifacts,
and evaluation of a reference-format checkpoint against the PyTorch reference network."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cpsl_jax import defaults, main
from cpsl_jax.data import layouts, open_dataset
from cpsl_jax.synthetic import SyntheticDataset, write_layout

ROOT = Path(__file__).resolve().parents[1]


def tiny(arg):
    spec = importlib.util.spec_from_file_location("tiny_config", ROOT / "configs" / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_unknown_keys_and_missing_paths_fail_before_compiling(tmp_path):
    # An override of a key the schema does not have is refused by the command line, naming it.
    proc = subprocess.run([sys.executable, "-m", "cpsl_jax.main", "--config=configs/tiny.py:warmup",
                           f"--workdir={tmp_path}/w", "--config.cpsl.temprature=0.1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "temprature" in proc.stderr
    # A key added by a config file is named too.
    config = tiny("warmup")
    config.cpsl.unlock()
    config.cpsl.temprature = 0.1
    with pytest.raises(defaults.ConfigError, match="cpsl.temprature"):
        main.run(config, tmp_path / "w2")
    # A missing artifact names the key and the path.
    config = tiny(f"stage1,{tmp_path}/nothing")
    with pytest.raises(defaults.ConfigError, match="init.checkpoint=.*nothing/warmup/model.msgpack"):
        main.run(config, tmp_path / "w3")


def test_config_checks_name_the_key_in_one_line(tmp_path):
    """What ``cpsl_jax/config_check.py`` refuses, each as one line naming the key (the command
    line's cases run as processes in tests/test_faults.py)."""
    import json

    from cpsl_jax import config_check

    config = tiny("warmup")
    # Unknown keys, from a config file or the demo's overrides: the closest ones are named.
    with pytest.raises(defaults.ConfigError, match=r"'train.step'.*closest: train.steps"):
        defaults.set_key(config, "train.step", "5")
    # Types: tuples keep their length, ints are not floats, bools are bools.
    for key, value, words in [("data.crop_size", (64,), "expected a tuple of 2 ints"),
                              ("train.steps", 1.5, "expected an int"), ("model.remat", 1, "expected a bool")]:
        bad = tiny("warmup")
        section, leaf = key.split(".")
        with bad.ignore_type():  # as a hand-built or deserialised config may hold it
            bad[section][leaf] = value
        with pytest.raises(defaults.ConfigError, match=f"{key}=.*{words}"):
            config_check.validate(bad)
    # The command line's config file must load: a missing file, an unknown stage.
    with pytest.raises(defaults.ConfigError, match="configs/nope.py does not exist"):
        config_check.check_overrides(["main", "--config=configs/nope.py"])
    with pytest.raises(defaults.ConfigError, match="configs/tiny.py:bogus: unknown stage 'bogus'"):
        config_check.check_overrides(["main", f"--config={ROOT}/configs/tiny.py:bogus"])
    # Batches divide over the devices and the processes.
    config_check.check_batch_sizes(config, device_count=4, process_count=2)
    with pytest.raises(defaults.ConfigError, match=r"data.batch_size=4 does not divide over the 8 devices "
                                                   r"\(2 processes\)"):
        config.data.eval_batch_size = 8
        config_check.check_batch_sizes(config, device_count=8, process_count=2)
    # A workdir with checkpoints resumes its own config; train.steps and the like may change.
    config = tiny("warmup")
    (tmp_path / "checkpoints" / "5").mkdir(parents=True)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict(), default=str))
    config.train.steps, config.train.eval_every, config.data.target_root = 50, 7, "/elsewhere"
    config_check.check_resume(config, tmp_path)
    config.seed, config.data.crop_size = 1, (32, 32)
    with pytest.raises(defaults.ConfigError, match=r"another config: data.crop_size=\[64, 32\] there, "
                                                   r"\[32, 32\] now; seed=0 there, 1 now"):
        config_check.check_resume(config, tmp_path)


def test_loading_a_model_file_checks_its_shapes_and_initialises_nothing(tmp_path, monkeypatch):
    """A stage that starts from a model file reads it as it is: no fresh initialisation is
    computed (its structure is checked against shapes alone), and a file of another network
    is refused, naming the file."""
    import jax
    from flax import serialization

    from cpsl_jax import models
    from cpsl_jax.train import io
    from cpsl_jax.train.state import build_model

    config = tiny("eval")
    rng = np.random.default_rng()
    shapes = models.variable_shapes(build_model(config, axis_name=None))
    variables = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)
    path = tmp_path / "other.msgpack"
    path.write_bytes(serialization.msgpack_serialize({"variables": variables}))

    def no_init(*args, **kwargs):
        raise AssertionError("a fresh initialisation was computed")

    monkeypatch.setattr(models, "init_variables", no_init)
    loaded = io.load_variables(config, str(path))["variables"]
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
    config.model.width = 16
    with pytest.raises(ValueError, match="other.msgpack: the weights do not fit"):
        io.load_variables(config, str(path))


def warmup(steps, *, checkpoint_every, eval_every):
    """The tiny warm-up run for ``steps`` steps."""
    c = tiny("warmup")
    c.train.steps, c.train.checkpoint_every, c.train.eval_every = steps, checkpoint_every, eval_every
    return c


def _model_bytes(workdir):
    return (Path(workdir) / "model.msgpack").read_bytes()


# The runs of the tiny warm-up compile one program: one xdist worker runs them, so that all but
# the first find it in the run's compilation cache (tests/conftest.py).
TINY_WARMUP_RUNS = pytest.mark.xdist_group("tiny-warmup-runs")


@TINY_WARMUP_RUNS
def test_interrupted_run_resumes_exactly(tmp_path):
    """2 steps, stop, resume to 4 == 4 steps in one go: same parameters, optimizer and data position."""
    config = lambda steps: warmup(steps, checkpoint_every=2, eval_every=0)  # noqa: E731
    main.run(config(4), tmp_path / "straight")
    main.run(config(2), tmp_path / "resumed")
    first_half = _model_bytes(tmp_path / "resumed")
    main.run(config(4), tmp_path / "resumed")
    assert _model_bytes(tmp_path / "resumed") != first_half
    assert _model_bytes(tmp_path / "resumed") == _model_bytes(tmp_path / "straight")


@TINY_WARMUP_RUNS
def test_the_best_model_survives_a_resume(tmp_path):
    """A resumed run compares its validations with the best one before the interruption."""
    import json

    config = lambda steps: warmup(steps, checkpoint_every=1, eval_every=1)  # noqa: E731
    main.run(config(2), tmp_path / "w")
    before = json.loads((tmp_path / "w" / "best.json").read_text())
    summary = main.run(config(3), tmp_path / "w")
    assert summary["best_miou"] >= before["miou"]
    if summary["best_step"] != 3:  # step 3 was not better: the best stays the earlier one
        assert summary["best_step"] == before["step"] and summary["best_miou"] == before["miou"]


@pytest.mark.torch
def test_evaluating_a_reference_checkpoint_matches_the_pytorch_network(tmp_path):
    torch = pytest.importorskip("torch")
    from cpsl_jax.torch_mirror import network as tr

    # A tiny Cityscapes-layout validation set, written in the real format.
    root = tmp_path / "cityscapes"
    write_layout(SyntheticDataset("target", "val", length=3, size=(64, 128), seed=3), str(root), "cityscapes")
    # A reference network with random weights and non-trivial statistics, saved as the authors do.
    torch.manual_seed(0)
    net = tr.ResNet101(num_classes=19, depth=14, width=8, head_width=32).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(0, (2.0 / m.weight[0].numel()) ** 0.5)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    ckpt = tmp_path / "reference.pkl"
    torch.save({"ResNet101": {"model_state": net.state_dict(), "prototypes_ema": torch.zeros(19, 32)},
                "iter": 7, "best_iou": 0.5}, ckpt)

    config = tiny("eval")
    config.init.checkpoint = str(ckpt)
    config.data.target, config.data.target_root = "cityscapes", str(root)
    config.data.target_base_size = (128, 64)
    workdir = tmp_path / "eval"
    summary = main.run(config, workdir)
    ours = np.load(workdir / "confusion_matrix.npy")

    # The same images through the PyTorch network: logits upsampled (align_corners), argmax.
    val = open_dataset("cityscapes", str(root), "val", 19, base_size=(128, 64))
    expected = np.zeros((19, 19), np.int64)
    for i in range(len(val)):
        item = val[i]
        x = torch.from_numpy(item["image"].copy()).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            logits = net(x)["out"]
            up = torch.nn.functional.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=True)
        pred = up.argmax(1)[0].numpy()
        keep = item["label"] != layouts.IGNORE_LABEL
        np.add.at(expected, (item["label"][keep].astype(int), pred[keep]), 1)
    assert ours.sum() == expected.sum() > 0
    np.testing.assert_array_equal(ours, expected)
    assert (workdir / "predictions").is_dir() and len(list((workdir / "predictions").glob("*.png"))) == 2
    assert 0.0 <= summary["miou"] <= 1.0


def test_a_non_finite_loss_stops_the_run_with_the_last_good_parameters(tmp_path):
    from cpsl_jax.train.guards import NonFiniteError

    config = tiny("warmup")
    config.optim.base_lr = 1e30  # the first update overflows; the next loss is not finite
    config.train.steps, config.train.eval_every, config.train.checkpoint_every = 3, 0, 1
    config.train.nonfinite_skip = 1  # one refused step is tolerated, the second stops the run
    with pytest.raises(NonFiniteError, match="2 step"):
        main.run(config, tmp_path / "w")
    import jax
    # The refused steps left the parameters of the last finite step (here: the initial ones) in
    # every checkpoint, and the run wrote no final model.
    import orbax.checkpoint as ocp

    steps = sorted(int(p.name) for p in (tmp_path / "w" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and not (tmp_path / "w" / "model.msgpack").exists()
    saved = ocp.StandardCheckpointer().restore(tmp_path / "w" / "checkpoints" / str(steps[-1]) / "state")
    leaves = [np.asarray(x) for x in jax.tree.leaves(saved["params"])]
    assert leaves and all(np.all(np.isfinite(x)) for x in leaves)
    assert int(saved["nonfinite_streak"]) >= 1


def test_sixteen_class_evaluation_reports_the_13_class_miou():
    import jax

    from cpsl_jax.evaluate import SYNTHIA_13_OF_16
    from cpsl_jax.train import loop, parallel
    from cpsl_jax.train.io import init_variables, open_split

    config = tiny("eval")
    config.model.num_classes = 16
    config.data.synthetic.length = 4
    variables = init_variables(config, jax.random.PRNGKey(0))
    result = loop.evaluate_variables(config, variables, open_split(config, "target", "val"), parallel.make_mesh())
    iou = np.asarray(result["per_class_iou"])
    assert iou.shape == (16,) and result["confusion_matrix"].sum() > 0
    expected = np.nanmean(iou[list(SYNTHIA_13_OF_16)]) if np.isfinite(iou[list(SYNTHIA_13_OF_16)]).any() else np.nan
    np.testing.assert_allclose(result["miou13"], expected)
