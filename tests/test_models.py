"""DeepLabV2 (Flax): shapes, reference BatchNorm, sync BN, bf16, dropout, remat, init, labels."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from cpsl_jax.models import (DeepLabV2, backbone_multiplicity, init_variables, output_size, param_labels,
                             variable_shapes)
from cpsl_jax.models.layers import max_pool_3x3_s2_ceil
from cpsl_jax.models.norm import BatchNorm

TINY = dict(num_classes=19, depth=14, width=8, head_width=32)


@pytest.fixture(scope="module")
def tiny_vars():
    """Random variables of the tiny model, drawn in NumPy (no init compile)."""
    model = DeepLabV2(**TINY)
    shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 1, 1, 3)), train=False), jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    flat = traverse_util.flatten_dict({c: dict(shapes[c]) for c in ("params", "batch_stats")})
    out = {}
    for path, spec in flat.items():
        shape = spec.shape
        if path[-1] == "kernel":  # He scale keeps activations in a useful range at any depth
            v = rng.normal(size=shape) * math.sqrt(2.0 / math.prod(shape[:-1]))
        elif path[-1] in ("scale", "var"):
            v = rng.uniform(0.5, 1.5, size=shape)
        else:
            v = 0.1 * rng.normal(size=shape)
        out[path] = jnp.asarray(v, jnp.float32)
    return traverse_util.unflatten_dict(out)


def test_output_shapes_paper_sizes():
    model = DeepLabV2()
    for (h, w), (oh, ow) in {(512, 896): (65, 113), (1024, 2048): (129, 257)}.items():
        x = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
        out = jax.eval_shape(lambda im: model.apply(model.init(jax.random.PRNGKey(0), im), im), x)
        assert out["logits"].shape == (1, oh, ow, 19) and out["features"].shape == (1, oh, ow, 256)
        assert (output_size(h), output_size(w)) == (oh, ow)


def test_max_pool_ceil_mode_vs_numpy():
    rng = np.random.default_rng(0)
    for h, w in [(9, 12), (8, 13), (5, 5), (2, 3)]:
        x = rng.normal(size=(2, h, w, 3)).astype(np.float32)
        got = np.asarray(max_pool_3x3_s2_ceil(jnp.asarray(x)))
        sizes = []
        for n in (h, w):  # PyTorch's ceil-mode size rule, with its "last window must start inside" fix
            out = math.ceil((n + 2 - 3) / 2) + 1
            if (out - 1) * 2 >= n + 1:
                out -= 1
            sizes.append(out)
        ref = np.empty((2, sizes[0], sizes[1], 3), np.float32)
        for i in range(sizes[0]):
            for j in range(sizes[1]):
                r0, c0 = 2 * i - 1, 2 * j - 1
                win = x[:, max(r0, 0) : min(r0 + 3, h), max(c0, 0) : min(c0 + 3, w)]
                ref[:, i, j] = win.max(axis=(1, 2))
        np.testing.assert_array_equal(got, ref)


def test_batchnorm_reference_semantics_vs_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, size=(3, 5, 4, 6)).astype(np.float32)
    x[..., 2] = 7.0  # zero variance: train mode clamps it to eps instead of adding eps
    x[..., 3] *= 1e-3  # variance below eps
    bn = BatchNorm()
    v = bn.init(jax.random.PRNGKey(0), jnp.asarray(x), train=False)
    scale, bias = rng.normal(size=6).astype(np.float32), rng.normal(size=6).astype(np.float32)
    rm, rv = rng.normal(size=6).astype(np.float32), rng.uniform(0.5, 2, size=6).astype(np.float32)
    v = {"params": {"scale": scale, "bias": bias}, "batch_stats": {"mean": rm, "var": rv}}
    y, upd = bn.apply(v, jnp.asarray(x), train=True, mutable=["batch_stats"])
    x64 = x.astype(np.float64)
    mean, var = x64.mean(axis=(0, 1, 2)), x64.var(axis=(0, 1, 2))
    n = x.size // 6
    ref = (x64 - mean) / np.sqrt(np.maximum(var, 1e-5)) * scale + bias
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(upd["batch_stats"]["mean"]), 0.9 * rm + 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(upd["batch_stats"]["var"]), 0.9 * rv + 0.1 * var * n / (n - 1), rtol=1e-4, atol=1e-6)
    y_eval = bn.apply(v, jnp.asarray(x), train=False)
    np.testing.assert_allclose(np.asarray(y_eval), (x64 - rm) / np.sqrt(rv + 1e-5) * scale + bias, rtol=1e-5, atol=1e-5)


def test_sync_batchnorm_shard_map_matches_single_device(tiny_vars):
    n = 4
    x = jax.random.uniform(jax.random.PRNGKey(2), (n, 29, 35, 3))
    single = DeepLabV2(**TINY, dropout_rate=0.0)
    ref, ref_upd = jax.jit(lambda v, im: single.apply(v, im, train=True, mutable=["batch_stats"]))(tiny_vars, x)
    synced = DeepLabV2(**TINY, dropout_rate=0.0, axis_name="data")

    def per_device(v, xs):
        out, upd = synced.apply(v, xs, train=True, mutable=["batch_stats"])
        return out, upd["batch_stats"]

    mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
    f = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data")), out_specs=(P("data"), P())))
    out, stats = f(tiny_vars, jax.device_put(x, jax.sharding.NamedSharding(mesh, P("data"))))
    np.testing.assert_allclose(np.asarray(out["logits"]), np.asarray(ref["logits"]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out["features"]), np.asarray(ref["features"]), rtol=1e-4, atol=1e-4)
    for (path, a), (_, b) in zip(
        sorted(traverse_util.flatten_dict(dict(stats)).items()), sorted(traverse_util.flatten_dict(dict(ref_upd["batch_stats"])).items())
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5, err_msg=str(path))
    # Per-device statistics (no sync) would differ: the test can tell the two apart.
    local, _ = jax.jit(lambda v, im: single.apply(v, im, train=True, mutable=["batch_stats"]))(tiny_vars, x[:1])
    assert not np.allclose(np.asarray(local["logits"]), np.asarray(ref["logits"][:1]), rtol=1e-3, atol=1e-3)


def test_bf16_compute_close_to_float32(tiny_vars):
    x = jax.random.uniform(jax.random.PRNGKey(3), (2, 65, 97, 3))
    run = lambda model: jax.jit(lambda v, im: model.apply(v, im, train=False))(tiny_vars, x)["logits"]  # noqa: E731
    f32, bf16 = run(DeepLabV2(**TINY)), run(DeepLabV2(**TINY, dtype=jnp.bfloat16))
    assert bf16.dtype == jnp.float32 and not np.any(np.isnan(np.asarray(bf16)))
    a, b = np.asarray(bf16, np.float64), np.asarray(f32, np.float64)
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 5e-2
    assert np.mean(a.argmax(-1) == b.argmax(-1)) >= 0.95
    assert not np.array_equal(a, b)  # bf16 really ran in lower precision


def test_dropout_is_channelwise_and_features_after_dropout(tiny_vars):
    x = jax.random.uniform(jax.random.PRNGKey(4), (2, 33, 41, 3))

    def run(rate, key):
        model = DeepLabV2(**TINY, dropout_rate=rate)
        f = lambda v, im, k: model.apply(v, im, train=True, mutable=["batch_stats"], rngs={"dropout": k})[0]  # noqa: E731
        return jax.jit(f)(tiny_vars, x, key)

    clean = run(0.0, jax.random.PRNGKey(5))
    out = run(0.5, jax.random.PRNGKey(5))
    ratio = np.asarray(out["features"]) / np.asarray(clean["features"])
    per_channel = ratio[:, :1, :1, :]
    np.testing.assert_allclose(ratio, np.broadcast_to(per_channel, ratio.shape), rtol=1e-5, atol=1e-5)
    assert set(np.round(np.unique(per_channel), 4)) == {0.0, 2.0}
    # logits are the classifier applied to the dropped-out features
    kernel = np.asarray(tiny_vars["params"]["layer5"]["head_1"]["kernel"])[0, 0]
    np.testing.assert_allclose(np.asarray(out["logits"]), np.asarray(out["features"]) @ kernel, rtol=1e-4, atol=1e-4)
    other = run(0.5, jax.random.PRNGKey(6))
    assert not np.allclose(np.asarray(other["features"]), np.asarray(out["features"]))


def test_remat_gives_same_gradients(tiny_vars):
    x = jax.random.uniform(jax.random.PRNGKey(7), (2, 25, 25, 3))

    def grads(remat):
        model = DeepLabV2(**TINY, dropout_rate=0.0, remat=remat)

        def loss(p):
            out, _ = model.apply({"params": p, "batch_stats": tiny_vars["batch_stats"]}, x, train=True, mutable=["batch_stats"])
            return jnp.sum(out["logits"] ** 2)

        return jax.jit(jax.grad(loss))(tiny_vars["params"])

    for a, b in zip(jax.tree.leaves(grads(False)), jax.tree.leaves(grads(True))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_fresh_init_follows_reference():
    model = DeepLabV2(num_classes=19, depth=14, width=16, head_width=64)
    v = init_variables(model, jax.random.PRNGKey(8))
    # The shapes-only variant describes the same variables.
    shapes = variable_shapes(model)
    assert jax.tree.structure(shapes) == jax.tree.structure(v)
    assert all(a.shape == s.shape and a.dtype == s.dtype for a, s in zip(jax.tree.leaves(v), jax.tree.leaves(shapes)))
    p = v["params"]
    k = np.asarray(p["layer4_0"]["conv2"]["kernel"])
    assert abs(k.std() - 0.01) < 5e-4 and abs(k.mean()) < 5e-4
    head = p["layer5"]
    assert float(np.std(head["head_1"]["kernel"])) == pytest.approx(0.01, rel=0.1)
    np.testing.assert_array_equal(np.asarray(head["bottleneck_1"]["bias"]), 0.0)
    for name, fan_in in [("conv2d_list_0_0", 512), ("conv2d_list_2_0", 512 * 9)]:
        b = np.asarray(head[name]["bias"])
        assert np.all(np.abs(b) <= 1 / math.sqrt(fan_in)) and np.abs(b).max() > 0.5 / math.sqrt(fan_in)
    se0 = np.asarray(head["bottleneck_0"]["se_0"]["kernel"])
    assert se0.shape == (320, 20) and np.abs(se0).max() <= 1 / math.sqrt(320) and se0.std() > 0.4 / math.sqrt(320)
    np.testing.assert_array_equal(np.asarray(p["bn1"]["scale"]), 1.0)
    np.testing.assert_array_equal(np.asarray(v["batch_stats"]["layer1_0"]["bn3"]["var"]), 1.0)


def test_param_labels_and_multiplicity_match_reference_generators():
    """Rebuild the reference's SGD parameter list (modules() walk) and count by identity."""
    pytest.importorskip("torch")
    from cpsl_jax import convert
    from cpsl_jax.torch_mirror import network as tr

    net = tr.ResNet101(num_classes=19, depth=101, bn_pretrain=True, width=8, head_width=32)
    counts: dict[int, int] = {}
    group: dict[int, str] = {}
    for module in net.backbone_modules():  # get_1x_lr_params
        for sub in module.modules():
            for t in sub.parameters():
                counts[id(t)] = counts.get(id(t), 0) + 1
                group[id(t)] = "backbone"
    for module, name in ((net.bn_pretrain, "bn_pretrain"), (net.layer5, "head")):  # get_10x_lr_params
        for t in module.parameters():
            counts[id(t)] = counts.get(id(t), 0) + 1
            group[id(t)] = name
    by_name = {k: counts[id(t)] for k, t in net.named_parameters()}
    labels_by_name = {k: group[id(t)] for k, t in net.named_parameters()}
    assert set(by_name.values()) == {1, 3, 4}

    shapes = convert._variable_shapes(19, True, 101, 8, 32)["params"]
    params = traverse_util.unflatten_dict(shapes)
    mult = traverse_util.flatten_dict(backbone_multiplicity(params))
    labels = traverse_util.flatten_dict(param_labels(params))
    assert {convert.torch_key(p): m for p, m in mult.items()} == by_name
    assert {convert.torch_key(p): s for p, s in labels.items()} == labels_by_name


def test_space_to_batch_dilated_convolutions_give_the_same_network():
    """The model's 'space_to_batch' dilated convolutions equal the native ones, outputs and gradients."""
    rng = np.random.default_rng()
    x = jnp.asarray(rng.uniform(0, 1, (2, 37, 45, 3)), jnp.float32)
    kw = dict(num_classes=5, depth=14, width=8, head_width=32)
    native = DeepLabV2(**kw)
    s2b = DeepLabV2(**kw, dilated_impl="space_to_batch")
    variables = native.init(jax.random.PRNGKey(int(rng.integers(1 << 30))), x, train=False)
    a = native.apply(variables, x, train=False)
    b = s2b.apply(variables, x, train=False)
    for k in ("logits", "features"):
        np.testing.assert_allclose(np.asarray(b[k]), np.asarray(a[k]), rtol=1e-4, atol=1e-5)
    grad = lambda m: jax.grad(lambda p: jnp.sum(m.apply({**variables, "params": p}, x, train=False)["logits"] ** 2))(
        variables["params"])
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=2e-3, atol=1e-5),
                 grad(s2b), grad(native))


@pytest.mark.parametrize("stride", [1, 2])
def test_pointwise_convolution_is_the_channel_product(stride, monkeypatch):
    """A 1x1 convolution, as a matrix product (CPU) or as XLA's convolution (other backends),
    equals the float64 product over channels of the strided input; gradients agree too."""
    from cpsl_jax.models import layers

    rng = np.random.default_rng()
    x = rng.standard_normal((2, 9, 7, 6)).astype(np.float32)
    w = rng.standard_normal((1, 1, 6, 5)).astype(np.float32)
    want = np.einsum("nhwc,co->nhwo", x.astype(np.float64)[:, ::stride, ::stride], w[0, 0].astype(np.float64))
    results = {}
    for backends in (("cpu",), ()):
        monkeypatch.setattr(layers, "POINTWISE_AS_DOT_BACKENDS", backends)
        f = lambda x, w: layers.conv2d(x, w, stride=stride)  # noqa: E731
        results[backends] = (f(x, w), jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))), argnums=(0, 1))(x, w))
        np.testing.assert_allclose(np.asarray(results[backends][0]), want, rtol=1e-5, atol=1e-5)
    for a, b in zip(results[("cpu",)][1], results[()][1]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
