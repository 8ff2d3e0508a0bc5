"""The PyTorch step's pieces agree with cpsl_jax.cpsl, and the JAX-vs-PyTorch benchmark produces a complete table."""
import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from cpsl_jax import benchmark, defaults, cpsl  # noqa: E402
from cpsl_jax import torch_mirror as T  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RTOL, ATOL = 1e-5, 1e-6


def nhwc(x: np.ndarray) -> jnp.ndarray:
    """(B, C, H, W) numpy -> (B, H, W, C) JAX."""
    return jnp.asarray(np.moveaxis(x, 1, -1))


def close(torch_value, jax_value, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(torch_value.detach()), np.asarray(jax_value), rtol=rtol, atol=atol)


def test_sinkhorn_matches_jax():
    rng = np.random.default_rng(0)
    scores = rng.uniform(-1, 1, (50, 7)).astype(np.float32)
    prior = rng.uniform(0.2, 1.0, 7).astype(np.float32)
    prior /= prior.sum()
    got = T.sinkhorn(torch.from_numpy(scores), torch.from_numpy(prior), epsilon=0.05, iterations=3)
    want = cpsl.sinkhorn(jnp.asarray(scores), jnp.asarray(prior), epsilon=0.05, iterations=3)
    close(got, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.sum(1).numpy(), 1.0, rtol=1e-5)


def test_cosine_scores_and_rectification_match_jax():
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((2, 8, 5, 6)).astype(np.float32)
    protos = rng.standard_normal((5, 8)).astype(np.float32)
    soft = rng.random((2, 5, 5, 6)).astype(np.float32)
    soft /= soft.sum(1, keepdims=True)
    got = T.cosine_scores(torch.from_numpy(feats), torch.from_numpy(protos))
    close(got.permute(0, 2, 3, 1), cpsl.cosine_scores(nhwc(feats), jnp.asarray(protos)))
    for threshold in (0.0, 0.5, 0.9):
        labels = T.rectify_pseudo_labels(torch.from_numpy(feats), torch.from_numpy(soft), torch.from_numpy(protos),
                                         temperature=0.08, threshold=threshold)
        want = cpsl.rectify_pseudo_labels(nhwc(feats), nhwc(soft), jnp.asarray(protos), temperature=0.08,
                                          threshold=threshold)
        np.testing.assert_array_equal(labels.numpy(), np.asarray(want))
    assert (np.asarray(want) == cpsl.IGNORE_INDEX).any()  # the threshold case exercised ignore


def test_segmentation_losses_match_jax():
    rng = np.random.default_rng(2)
    logits = (3 * rng.standard_normal((2, 6, 7, 9))).astype(np.float32)
    labels = rng.integers(0, 6, (2, 7, 9))
    labels[rng.random(labels.shape) < 0.3] = 255
    t_logits, t_labels = torch.from_numpy(logits), torch.from_numpy(labels)
    j_logits, j_labels = nhwc(logits), jnp.asarray(labels)
    close(T.cross_entropy(t_logits, t_labels), cpsl.cross_entropy(j_logits, j_labels))
    close(T.reverse_cross_entropy(t_logits, t_labels), cpsl.reverse_cross_entropy(j_logits, j_labels))
    close(T.symmetric_cross_entropy(t_logits, t_labels, 0.1, 1.0),
          cpsl.symmetric_cross_entropy(j_logits, j_labels, alpha=0.1, beta=1.0))


def test_consistency_and_distillation_match_jax():
    rng = np.random.default_rng(3)
    t_scores = rng.uniform(-1, 1, (2, 5, 6, 7)).astype(np.float32)
    s_scores = rng.uniform(-1, 1, (2, 5, 6, 7)).astype(np.float32)
    valid = rng.random((2, 6, 7)) < 0.7
    got = T.prototype_consistency(torch.from_numpy(t_scores), torch.from_numpy(s_scores), torch.from_numpy(valid), 0.08)
    want = cpsl.prototype_consistency(nhwc(t_scores), nhwc(s_scores), jnp.asarray(valid)[..., None], 0.08)
    close(got, want, rtol=1e-4)
    for quirk in (True, False):
        got = T.distillation_kl(torch.from_numpy(s_scores * 4), torch.from_numpy(t_scores * 4), quirk=quirk)
        close(got, cpsl.distillation_kl(nhwc(s_scores * 4), nhwc(t_scores * 4), quirk=quirk), rtol=1e-4)


def test_contrastive_matches_jax():
    rng = np.random.default_rng(4)
    unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
    anchors = unit(rng.standard_normal((2, 6, 8)))
    queue = unit(rng.standard_normal((20, 8)))
    a_labels = rng.choice([0, 1, 2, 255], (2, 6))
    q_labels = rng.choice([0, 1, 2, 255], 20)
    got = T.queue_contrastive(torch.from_numpy(anchors), torch.from_numpy(a_labels), torch.from_numpy(queue),
                              torch.from_numpy(q_labels), 0.08)
    want = cpsl.contrastive_share(jnp.asarray(anchors), jnp.asarray(a_labels), jnp.asarray(queue),
                                  jnp.asarray(q_labels), 0.08)
    close(got, want, rtol=1e-4)


def test_self_labeling_scan_matches_jax():
    """Loss, gradient on the prototypes and the queues after the scan (the queue fills mid-batch)."""
    rng = np.random.default_rng(5)
    b, n, d, c, k = 3, 4, 8, 5, 8
    feats = rng.standard_normal((b, n, d)).astype(np.float32)
    logits = (2 * rng.standard_normal((b, n, c))).astype(np.float32)
    protos = rng.standard_normal((c, d)).astype(np.float32)
    push_labels = rng.integers(0, c, (b, n))
    prior = np.full(c, 1.0 / c, np.float32)

    p = torch.nn.Parameter(torch.from_numpy(protos))
    fq, oq = T.Queue(k, d, "cpu", with_labels=True), T.Queue(k, c, "cpu")
    loss, was_in_use = T.self_labeling_loss(torch.from_numpy(feats), torch.from_numpy(logits), p, fq, oq,
                                            torch.from_numpy(push_labels), torch.from_numpy(prior))
    loss.backward()

    def jax_loss(prototypes):
        out, jfq, joq = cpsl.self_labeling_loss(
            jnp.asarray(feats), jnp.asarray(logits), prototypes, cpsl.init_queue(k, d, with_labels=True),
            cpsl.init_queue(k, c), jnp.asarray(push_labels), jnp.asarray(prior))
        return out, (jfq, joq)

    (want, (jfq, joq)), grad = jax.value_and_grad(jax_loss, has_aux=True)(jnp.asarray(protos))
    close(loss, want, rtol=1e-4)
    close(p.grad, grad, rtol=1e-4, atol=1e-5)
    close(fq.rows, jfq.rows)
    close(oq.rows, joq.rows)
    np.testing.assert_array_equal(fq.labels.numpy(), np.asarray(jfq.labels))
    assert was_in_use == bool(jfq.was_in_use) is True


def test_flops_analytic_equals_torch_hooks():
    for path, stage, hw in (("configs/tiny.py", "stage1", (32, 64)), ("configs/gta5.py", "stage2", (65, 97))):
        config = benchmark.load_config(str(ROOT / path), stage)
        with torch.device("meta"):
            net = T.build_network(config)
        assert benchmark.network_flops(config, 2, hw) == T.count_flops(net, (2, 3, *hw))
    # The paper's shapes give gpu-anchors.md's counts: 3.85 TFLOP per student pass, 52.0 per stage-1 step.
    config = benchmark.load_config(str(ROOT / "configs/gta5.py"), "stage1")
    assert abs(benchmark.network_flops(config, 4, (512, 896)) / 1e12 - 3.85) < 0.01
    assert abs(benchmark.step_flops(config) / 1e12 - 52.0) < 0.1


def test_overrides():
    config = benchmark.load_config(str(ROOT / "configs/gta5.py"), "stage1")
    benchmark.apply_overrides(config, batch=2, crop="224x128", target_size="512x256",
                              sets=["cpsl.queue_size=4096", "model.dtype=bfloat16"])
    assert config.data.batch_size == 2 and tuple(config.data.crop_size) == (224, 128)
    assert tuple(config.data.target_base_size) == tuple(config.data.source_base_size) == (512, 256)
    assert config.data.rescale_base_width == 550 and config.cpsl.queue_size == 4096
    assert config.model.dtype == "bfloat16"
    with pytest.raises(defaults.ConfigError, match="cpsl.temprature"):
        benchmark.apply_overrides(config, sets=["cpsl.temprature=1"])
    with pytest.raises(SystemExit, match="error: unknown config key 'cpsl.temprature'"):
        benchmark.main(["--config", str(ROOT / "configs/tiny.py"), "--set", "cpsl.temprature=1"])
    with pytest.raises(SystemExit, match="configs/nothere.py does not exist"):
        benchmark.main(["--config", "configs/nothere.py"])


def test_benchmark_table_is_complete(tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = benchmark.main(["--config", str(ROOT / "configs/tiny.py"), "--stages", "stage1,stage2",
                             "--variants", "jax,torch-fp32", "--repeats", "1", "--torch-threads", "1",
                             "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"], default=str))
    rows = {(r["stage"], r["variant"]): r for r in result["rows"]}
    assert set(rows) == {(s, v) for s in ("stage1", "stage2") for v in ("jax", "torch-fp32")}
    for (stage, variant), row in rows.items():
        assert "error" not in row, row.get("error")
        assert math.isfinite(row["images_per_s"]) and row["images_per_s"] > 0
        assert row["flops"] > 0 and row["tflops_per_s"] > 0
        assert math.isfinite(row["loss"]) and row["first_iter_s"] > 0
        assert row["peak_memory_gib"] > 0 and row["memory_kind"]
        if variant == "jax":
            for key in ("lower_s", "compile_s", "warm_lower_s", "warm_compile_s", "xla_temp_gib"):
                assert row[key] >= 0, key
            assert row["speed_vs_torch-fp32"] > 0
    machine = result["machine"]
    assert machine["jax"] and machine["torch"] and machine["cpu_count"] >= 1 and machine["date"]
    table = capsys.readouterr().out
    assert "stage1  jax" in table and "stage2  torch-fp32" in table


def test_failing_variant_is_a_row_not_a_crash(tmp_path):
    """A variant that cannot run (here: torch on a GPU this machine lacks) gives a row with ``error``."""
    device = "cuda:0" if not torch.cuda.is_available() else "no-such-device"
    result = benchmark.main(["--config", str(ROOT / "configs/tiny.py"), "--stages", "stage2", "--variants",
                             "torch-fp32", "--repeats", "1", "--torch-device", device,
                             "--out", str(tmp_path / "b.json")])
    (row,) = result["rows"]
    assert row["variant"] == "torch-fp32" and row["error"] and not row["times_s"]
    assert json.loads((tmp_path / "b.json").read_text())["rows"][0]["error"]


def test_benchmark_module_imports_without_torch():
    code = "import sys, cpsl_jax.benchmark; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_frozen_running_stats_normalise_alike_and_leave_the_statistics():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4)).train()
    x = torch.randn(2, 3, 8, 8) * 3 + 1
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert T.batch_norms(net) == [net[1], net[4]]
    with T.running_stats_frozen(T.batch_norms(net)):
        frozen_out = net(x)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items() if "running" in k)
    assert [m.momentum for m in net if isinstance(m, torch.nn.BatchNorm2d)] == [0.1, 0.1]
    moving_out = net(x)  # the same batch statistics normalise it; now the running ones move
    torch.testing.assert_close(frozen_out, moving_out)
    mean = net[0](x).mean(dim=(0, 2, 3))
    torch.testing.assert_close(net[1].running_mean, 0.9 * before["1.running_mean"] + 0.1 * mean)


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
@pytest.mark.parametrize("target_only", [False, True])
def test_the_torch_steps_move_running_stats_where_the_jax_steps_do(stage, target_only):
    """Stage 1's source, mixed weak target and strong passes, stage 2's source and target
    passes, in that order: with ``cpsl.target_running_stats`` (``kd.`` for stage 2) only the
    target pass that the JAX step lets update them runs with a BatchNorm momentum."""
    config = defaults.load_config_file(ROOT / "configs/tiny.py").get_config(stage)
    config.cpsl.target_running_stats = config.kd.target_running_stats = target_only
    step = T.make_step(config, "fp32", "cpu")
    seen, forward = [], step.student_fwd
    first_norm = next(m for m in step.student.modules() if isinstance(m, torch.nn.BatchNorm2d))

    def recording(x):
        seen.append(first_norm.momentum)
        return forward(x)

    step.student_fwd = recording
    out = step.step(T.to_device_batch(benchmark.random_batch(config, np.random.default_rng(0)), "cpu"))
    assert math.isfinite(float(out["loss"]))
    updating = [m != 0.0 for m in seen]
    expected = {"stage1": [False, True, False], "stage2": [False, True]}[stage]
    assert updating == (expected if target_only else [True] * len(expected))
