"""The stage steps: they run and learn, and 4 devices, 1 device, shard_map and pmap agree."""
import functools
import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest

from cpsl_jax import models
from cpsl_jax.train import parallel, steps
from cpsl_jax.train import state as state_lib
from cpsl_jax.train.io import init_discriminator, init_variables

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(stage, **overrides):
    spec = importlib.util.spec_from_file_location("tiny_config", ROOT / "configs" / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(stage)
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def make_batch(config, rng, batch=4, noise=16):
    """Images of random 8x8 blocks plus noise at base size whose label is a function of the block
    colour (so it can be learnt), with soft and hard pseudo labels; image i has an ignored
    fraction of i/4 so the devices see different valid counts. (The noise avoids exact ties in
    max-pool windows, whose gradient routing would otherwise depend on rounding.)"""
    h, w = config.data.synthetic.size
    c = config.model.num_classes

    def image():
        blocks = np.repeat(np.repeat(rng.integers(16, 240, (batch, h // 8, w // 8, 3)), 8, 1), 8, 2)
        return blocks, np.clip(blocks + rng.integers(-noise, noise + 1, blocks.shape), 0, 255).astype(np.uint8)

    (source_blocks, source), (target_blocks, target) = image(), image()
    # Four classes of the 19, told apart by the red and green halves of the block colour.
    to_label = lambda blocks: ((blocks[..., 0] >= 128) + 2 * (blocks[..., 1] >= 128)).astype(np.uint8)  # noqa: E731
    labels = to_label(source_blocks)
    for i in range(batch):
        labels[i, : h * i // 4] = 255
    soft = rng.random((batch, c, 9, 17)).astype(np.float32) + 0.05
    soft /= soft.sum(1, keepdims=True)
    pseudo = to_label(target_blocks)
    pseudo[:, -h // 4:] = 255
    return {"source": {"image": source, "label": labels},
            "target": {"image": target, "soft_label": soft.astype(np.float16), "pseudo_label": pseudo}}


def build(config, seed=0):
    """(per-device step function, initial host state) for ``config.stage``."""
    tx = state_lib.make_optimizer(config)
    variables = init_variables(config, jax.random.PRNGKey(seed))
    model = state_lib.build_model(config)
    rng = np.random.default_rng(seed)
    stage = config.stage
    if stage == "warmup":
        disc_tx = state_lib.make_discriminator_optimizer(config)
        state = state_lib.create_state(config, variables, tx, rng=jax.random.PRNGKey(seed),
                                       discriminator=init_discriminator(config, jax.random.PRNGKey(seed + 1)),
                                       disc_tx=disc_tx)
        fn = functools.partial(steps.warmup_step, model=model, discriminator=models.Discriminator(), tx=tx,
                               disc_tx=disc_tx, config=config)
    elif stage == "stage1":
        prototypes = rng.standard_normal((config.model.num_classes, config.model.head_width)).astype(np.float32)
        prior = rng.random(config.model.num_classes).astype(np.float32)
        state = state_lib.create_state(config, variables, tx, rng=jax.random.PRNGKey(seed), prototypes=prototypes,
                                       class_prior=prior / prior.sum())
        fn = functools.partial(steps.stage1_step, model=model, tx=tx, config=config)
    elif stage == "self_training":
        state = state_lib.create_state(config, variables, tx, rng=jax.random.PRNGKey(seed))
        fn = functools.partial(steps.self_training_step, model=model, tx=tx, config=config)
    else:
        teacher = init_variables(config, jax.random.PRNGKey(seed + 7))
        state = state_lib.create_state(config, variables, tx, rng=jax.random.PRNGKey(seed), teacher=teacher)
        fn = functools.partial(steps.distill_step, model=model, teacher_model=state_lib.build_model(config, axis_name=None),
                               tx=tx, config=config)
    return fn, state


def run(config, batches, devices, backend="shard_map"):
    fn, state = build(config)
    mesh = parallel.make_mesh(jax.devices()[:devices])
    step = parallel.data_parallel(fn, mesh, backend=backend)
    if backend == "pmap":
        state = parallel.stack_for_pmap(state, mesh)
        place = lambda b: jax.tree.map(lambda x: x.reshape(devices, -1, *x.shape[1:]), b)  # noqa: E731
    else:
        state = parallel.replicate(state, mesh)
        place = lambda b: parallel.shard_batch(b, mesh)  # noqa: E731
    history = []
    for b in batches:
        state, metrics = step(state, place(b))
        history.append(jax.tree.map(lambda m: float(np.ravel(m)[0]), jax.device_get(metrics)))
    state = jax.device_get(state)
    if backend == "pmap":
        state = jax.tree.map(lambda x: x[0], state)
    return state, history


# Tests that compile the same program run on one xdist worker (``--dist loadgroup``), one after
# the other, so that the second finds it in the run's compilation cache (tests/conftest.py).
ONE_DEVICE_STAGE1 = pytest.mark.xdist_group("stage1-one-device")    # dropout on, lr 2e-2
FOUR_DEVICE_STAGE1 = pytest.mark.xdist_group("stage1-four-devices")  # dropout off, lr 1e-3
FOUR_DEVICE_STAGE2 = pytest.mark.xdist_group("stage2-four-devices")  # with tests/test_multihost.py
FIXED_BATCH_LR = 2e-2
EQUIVALENCE = {"model.dropout_rate": 0.0, "optim.base_lr": 1e-3}


@pytest.mark.parametrize("stage", ["warmup", pytest.param("stage1", marks=ONE_DEVICE_STAGE1), "stage2",
                                   "self_training"])
def test_steps_are_finite_and_learn_on_a_fixed_batch(stage):
    config = tiny_config(stage, **{"optim.base_lr": FIXED_BATCH_LR})
    batch = make_batch(config, np.random.default_rng(0), noise=0)
    _, history = run(config, [batch] * 10, devices=1)
    losses = np.array([h["loss"] for h in history])
    assert np.all(np.isfinite(losses)), losses
    source = np.array([h["source_ce"] for h in history])
    assert source[-3:].mean() < source[:3].mean() - 0.05, source  # the supervised term goes down
    if stage == "self_training":  # the pseudo-labelled target term goes down too
        target = np.array([h["target_ce"] for h in history])
        assert target[-3:].mean() < target[:3].mean() - 0.05, target
    if stage == "stage1":
        assert history[-1]["queue_in_use"] == 1.0  # the 64-row queue filled up
        assert any(h["contrastive"] > 0 for h in history)


def _assert_states_close(a, b, rtol, field_rtol=None):
    """Each field of the state (params, statistics, optimizer, teacher, queues, ...) equal up to a
    relative L2 error of ``rtol`` over all its leaves (``field_rtol[field]`` where given).

    Leaf by leaf is too strict: a BatchNorm bias right before another normalisation gets a
    gradient that is a sum of cancelling terms, pure summation-order noise on an untrained
    network. A real mistake (a missing or doubled psum) moves a whole field by tens of percent.
    """
    for field in a.__dataclass_fields__:
        tol = (field_rtol or {}).get(field, rtol)
        x, y = getattr(a, field), getattr(b, field)
        xs = [np.asarray(v, np.float64).ravel() for v in jax.tree.leaves(x)]
        ys = [np.asarray(v, np.float64).ravel() for v in jax.tree.leaves(y)]
        assert len(xs) == len(ys), field
        if not ys:
            continue
        xv, yv = np.concatenate(xs), np.concatenate(ys)
        err = np.linalg.norm(xv - yv) / max(np.linalg.norm(yv), 1e-30)
        assert err < tol, f"{field}: relative L2 difference {err:.2e}"


@pytest.mark.parametrize("stage", [pytest.param("stage1", marks=FOUR_DEVICE_STAGE1),
                                   pytest.param("stage2", marks=FOUR_DEVICE_STAGE2)])
def test_four_devices_give_the_state_of_one_device(stage):
    """Each step on 4 devices (one image each) equals the step on 1 device with all 4 images.

    Both start every step from the same state (the 1-device one), three steps in a row, so the
    stage-1 queues fill and the contrastive term runs. Chaining the two runs separately would
    compare chaotic amplifications of summation-order rounding (argmax near-ties of the
    rectified labels, on an untrained network) rather than the step. Dropout is off: its masks
    are the only draw that depends on how the batch is split. The momentum buffers compared
    hold the gradients themselves. In a stage-1 step with CutMix, the gradients of the first
    layers differ by 2-4e-4 (relative L2) between 1 and 4 devices, where everything else,
    the loss and those gradients in a step without CutMix agree to a few 1e-6: the momentum
    buffers are held to 1e-3, still a hundred times below a missing or doubled psum.
    """
    config = tiny_config(stage, **EQUIVALENCE)
    # Fixed data: on an untrained network some random draws put a rectified pseudo label's
    # argmax within rounding of a tie, and 1 vs 4 devices may then label one pixel differently.
    rng = np.random.default_rng(7)
    fn, state = build(config)
    mesh1, mesh4 = parallel.make_mesh(jax.devices()[:1]), parallel.make_mesh(jax.devices()[:4])
    step1, step4 = parallel.data_parallel(fn, mesh1), parallel.data_parallel(fn, mesh4)
    state = jax.device_get(state)
    for _ in range(3):
        batch = make_batch(config, rng)
        one, m1 = step1(parallel.replicate(state, mesh1), parallel.shard_batch(batch, mesh1))
        four, m4 = step4(parallel.replicate(state, mesh4), parallel.shard_batch(batch, mesh4))
        one, four = jax.device_get((one, four))
        np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-5)
        _assert_states_close(four, one, rtol=1e-4, field_rtol={"opt_state": 1e-3})
        if stage == "stage1":
            np.testing.assert_array_equal(four.feature_queue.labels, one.feature_queue.labels)
        state = one
    if stage == "stage1":
        assert bool(state.feature_queue.was_in_use) and float(m1["contrastive"]) != 0.0


@FOUR_DEVICE_STAGE1
def test_pmap_gives_the_state_of_shard_map():
    config = tiny_config("stage1", **EQUIVALENCE)
    rng = np.random.default_rng()
    batches = [make_batch(config, rng) for _ in range(2)]
    sm, _ = run(config, batches, devices=4, backend="shard_map")
    pm, _ = run(config, batches, devices=4, backend="pmap")
    _assert_states_close(pm, sm, rtol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_passes_that_do_not_update_running_statistics_leave_them(scan):
    """``cpsl.target_running_stats``: of stage 1's three student passes only the weak target one
    moves the running statistics. Every pass still normalises with its own batch statistics
    (outputs as with all passes updating), and the statistics left are those of the weak pass
    alone, applied to the initial ones."""
    config = tiny_config("stage1", **{"model.dropout_rate": 0.0})
    model = state_lib.build_model(config, axis_name=None)
    rng = np.random.default_rng()
    variables = init_variables(config, jax.random.PRNGKey(0))
    views = [jax.numpy.asarray(rng.uniform(0, 1, (2, 32, 48, 3)), jax.numpy.float32) * (i + 1) for i in range(3)]
    keys = list(jax.random.split(jax.random.PRNGKey(1), 3))

    def run_passes(update):
        passes = steps._StudentPasses(model, variables["params"], variables["batch_stats"], views, keys, scan=scan,
                                      update_stats=update)
        outs = [passes.next() for _ in views]
        return outs, passes.stats

    outs_all, stats_all = run_passes(None)
    outs_weak, stats_weak = run_passes((False, True, False))
    _, alone = steps._apply(model, variables["params"], variables["batch_stats"], views[1], train=True, key=keys[1])
    for a, b in zip(jax.tree.leaves(outs_weak), jax.tree.leaves(outs_all)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(stats_weak), jax.tree.leaves(alone)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # With every pass updating, the third view (3x the first's scale) dominates instead.
    first_var = lambda stats: np.asarray(jax.tree.leaves(stats)[1])  # noqa: E731
    assert np.abs(first_var(stats_all) - first_var(stats_weak)).max() > 1e-3


@pytest.mark.parametrize("stage", ["stage1", "stage2", "self_training"])
@pytest.mark.parametrize("target_only", [False, True])
def test_the_steps_let_only_their_target_pass_move_running_statistics(monkeypatch, stage, target_only):
    """``cpsl.target_running_stats`` (stage 1) and ``kd.target_running_stats`` (stages 2 and 3)
    reach the student passes: stage 1's are source, mixed weak target and strong view, stage
    2's source and target. (Traced, not compiled: the passes themselves are checked above.)"""
    key = {"stage1": "cpsl.target_running_stats", "self_training": "self_training.target_running_stats"}.get(
        stage, "kd.target_running_stats")
    config = tiny_config(stage, **{key: target_only})
    fn, state = build(config)
    seen, passes = [], steps._StudentPasses

    def recording(*args, update_stats=None, **kwargs):
        seen.append(update_stats)
        return passes(*args, update_stats=update_stats, **kwargs)

    monkeypatch.setattr(steps, "_StudentPasses", recording)
    mesh = parallel.make_mesh(jax.devices()[:1])
    batch = parallel.shard_batch(make_batch(config, np.random.default_rng(0), batch=2), mesh)
    jax.eval_shape(parallel.data_parallel(fn, mesh), parallel.replicate(state, mesh), batch)
    target = (False, True, False) if stage == "stage1" else (False, True)
    assert seen == [target if target_only else (True,) * len(target)]


@ONE_DEVICE_STAGE1
def test_scanned_student_passes_equal_separate_passes():
    """``train.scan_passes`` compiles the network once for the three student passes of stage 1;
    the step's state (batch statistics chained pass after pass, dropout on) is the one the
    separate passes give. (Fixed data, as in the 4-device test: argmax near-ties.)"""
    lr = {"optim.base_lr": FIXED_BATCH_LR}
    config = tiny_config("stage1", **lr)
    batch = make_batch(config, np.random.default_rng(7))
    scanned, hs = run(tiny_config("stage1", **lr, **{"train.scan_passes": True}), [batch], devices=1)
    unrolled, hu = run(tiny_config("stage1", **lr, **{"train.scan_passes": False}), [batch], devices=1)
    np.testing.assert_allclose(hs[0]["loss"], hu[0]["loss"], rtol=1e-5)
    _assert_states_close(scanned, unrolled, rtol=1e-4)
    # Each pass moved the running statistics: they differ from the initial ones.
    _, initial = build(config)
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                         scanned.batch_stats, jax.device_get(initial.batch_stats))
    assert max(jax.tree.leaves(moved)) > 1e-3


def test_source_only_warmup_step_is_the_adversarial_step_without_target():
    """With ``adv.weight == 0`` the warm-up step trains on source labels alone (its batch has no
    target entry, as the loop then loads none): its parameter
    update is the adversarial step's with a vanishing weight, the discriminator keeps its
    parameters and the running statistics move by the source pass only (one momentum update
    toward the source batch, where the adversarial step also folds in the target's)."""
    batch = make_batch(tiny_config("warmup"), np.random.default_rng())
    only, h_only = run(tiny_config("warmup", **{"adv.weight": 0.0}), [{"source": batch["source"]}], devices=1)
    tiny, h_tiny = run(tiny_config("warmup", **{"adv.weight": 1e-30}), [batch], devices=1)
    _, initial = build(tiny_config("warmup"))
    initial = jax.device_get(initial)
    np.testing.assert_allclose(h_only[0]["source_ce"], h_tiny[0]["source_ce"], rtol=1e-6)
    assert h_only[0]["adv"] == h_only[0]["disc"] == 0.0 and h_tiny[0]["disc"] > 0
    for a, b in zip(jax.tree.leaves(only.params), jax.tree.leaves(tiny.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    for a, b in zip(jax.tree.leaves(only.disc_params), jax.tree.leaves(initial.disc_params)):
        np.testing.assert_array_equal(a, b)
    assert any(np.abs(a - b).max() > 0 for a, b in zip(jax.tree.leaves(tiny.disc_params),
                                                        jax.tree.leaves(initial.disc_params)))
    # Running mean of the first BatchNorm: (1 - m) * initial + m * source batch mean, where the
    # adversarial step applies a second update with the target batch's mean on top.
    m0 = np.asarray(jax.tree.leaves(initial.batch_stats)[0])
    m_only = np.asarray(jax.tree.leaves(only.batch_stats)[0])
    m_tiny = np.asarray(jax.tree.leaves(tiny.batch_stats)[0])
    assert np.abs(m_only - m0).max() > 1e-3 and np.abs(m_tiny - m_only).max() > 1e-3


def test_self_training_step_is_cross_entropy_on_its_thresholded_pseudo_labels():
    """With a weak view that only flips (crop = image, no rescale), the step's ``target_ce`` is the
    cross-entropy, in float64, of the network's logits on the flipped-or-not target images
    against the pseudo labels moved the same way, ignored pixels left out; ``source_ce`` likewise
    on the source images. The flips are the step's own draws: one of the four combinations of
    two images must match, and only one."""
    from cpsl_jax import ops

    config = tiny_config("self_training", **{"data.crop_size": (128, 64), "data.rescale_base_width": 128,
                                             "data.rescale_range": (1.0, 1.0), "model.dropout_rate": 0.0})
    fn, state = build(config)
    batch = make_batch(config, np.random.default_rng(3), batch=2)
    batch["target"]["pseudo_label"][0, :, :40] = 255  # pixels a threshold dropped
    model = state_lib.build_model(config, axis_name=None)
    variables = jax.tree.map(np.array, {"params": state.params["model"], "batch_stats": state.batch_stats})
    mesh = parallel.make_mesh(jax.devices()[:1])  # the step donates its state: variables copied first
    _, metrics = parallel.data_parallel(fn, mesh)(parallel.replicate(state, mesh), parallel.shard_batch(batch, mesh))

    def ce(images, labels):
        out = model.apply(variables, np.asarray(images, np.float32) / 255.0, train=True, mutable=["batch_stats"])[0]
        logits = np.asarray(ops.resize_bilinear(out["logits"], labels.shape[1:3]), np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        valid = labels != 255
        return -np.take_along_axis(logp, np.where(valid, labels, 0)[..., None].astype(np.int64), -1)[..., 0][valid].mean()

    matches = []
    for flips in [(a, b) for a in (False, True) for b in (False, True)]:
        flip = lambda x: np.stack([x[i][:, ::-1] if f else x[i] for i, f in enumerate(flips)])  # noqa: E731
        expected = ce(flip(batch["target"]["image"]), flip(batch["target"]["pseudo_label"]))
        matches.append(abs(expected - float(metrics["target_ce"])) < 1e-4 * expected)
    assert sum(matches) == 1, (matches, float(metrics["target_ce"]))
