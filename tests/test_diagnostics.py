"""The diagnostics the demo reports next to each stage: BatchNorm statistics re-estimated on the
target training images (``tools.target_statistics``, the AdaBN baseline, also
``eval.target_statistics``) and the ground truth as soft pseudo labels
(``tools.true_soft_label``, ``data.soft_labels_from_ground_truth``)."""
import jax
import numpy as np
import pytest

from cpsl_jax import defaults, tools
from cpsl_jax.train import parallel
from cpsl_jax.train.io import load_variables, open_split


def _config(length: int):
    c = defaults.base()
    c.stage = "eval"
    c.model.depth, c.model.width, c.model.head_width = 14, 8, 32
    c.data.target = "synthetic-target"
    c.data.synthetic.size = (32, 64)
    c.data.synthetic.length = length
    c.data.eval_batch_size = 4
    c.data.worker_count = 0
    return c


@pytest.fixture(scope="module")
def variables():
    c = _config(8)
    v = load_variables(c, "")["variables"]
    # Running statistics that are clearly not the target's, so that a no-op would be caught.
    return {**v, "batch_stats": jax.tree.map(lambda a: np.full_like(a, 3.0), v["batch_stats"])}


def _stem_moments(images: np.ndarray, kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased variance over a batch of the 7x7 stride-2 stem convolution, float64."""
    x = np.pad(images.astype(np.float64) / 255.0, ((0, 0), (3, 3), (3, 3), (0, 0)))
    n, h, w, _ = images.shape
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    patches = np.stack([x[:, i:i + 2 * ho:2, j:j + 2 * wo:2, :] for i in range(7) for j in range(7)], axis=3)
    out = np.einsum("nhwkc,kco->nhwo", patches, kernel.astype(np.float64).reshape(49, kernel.shape[2], -1))
    flat = out.reshape(-1, out.shape[-1])
    return flat.mean(0), flat.var(0, ddof=1)


def test_stem_statistics_are_the_float64_batch_moments_averaged_over_batches(variables):
    c = _config(8)
    stats, used = tools.target_statistics(c, variables, parallel.make_mesh())
    assert used == 8
    train = open_split(c, "target", "train")
    images = np.stack([train[i]["image"] for i in range(8)])
    kernel = np.asarray(variables["params"]["conv1"]["kernel"])
    moments = [_stem_moments(images[k:k + 4], kernel) for k in (0, 4)]
    mean = (moments[0][0] + moments[1][0]) / 2
    var = (moments[0][1] + moments[1][1]) / 2
    np.testing.assert_allclose(stats["bn1"]["mean"], mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["bn1"]["var"], var, rtol=1e-4, atol=1e-8)
    # Every layer got new statistics (none kept the planted 3.0), variances positive.
    for leaf in jax.tree.leaves(stats):
        assert not np.allclose(leaf, 3.0)
    assert all((np.asarray(s["var"]) > 0).all() for s in jax.tree.leaves(stats, is_leaf=lambda d: "var" in d))


def test_one_device_gives_the_statistics_of_four_and_a_partial_batch_is_left_out(variables):
    four = tools.target_statistics(_config(8), variables, parallel.make_mesh())[0]
    one = tools.target_statistics(_config(8), variables, parallel.make_mesh(jax.devices()[:1]))[0]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), one, four)
    # 6 images in batches of 4: the second batch is half padding and does not count, so the
    # result is that of the first 4 images alone (items depend on their index only).
    six, used = tools.target_statistics(_config(6), variables, parallel.make_mesh())
    first, _ = tools.target_statistics(_config(4), variables, parallel.make_mesh())
    assert used == 4
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), six, first)


def test_too_few_images_for_one_batch_is_an_error_naming_the_key(variables):
    with pytest.raises(ValueError, match="eval_batch_size=4"):
        tools.target_statistics(_config(3), variables, parallel.make_mesh())


def test_the_eval_tool_evaluates_with_target_statistics_when_asked(tmp_path):
    from cpsl_jax.train.loop import evaluate_variables

    c = _config(8)
    c.eval.save_predictions = 0
    c.eval.target_statistics = True
    summary = tools.run(c, tmp_path / "eval")
    assert summary["batch_statistics"] == "target training images"
    mesh = parallel.make_mesh()
    v = load_variables(c, "")["variables"]
    stats, _ = tools.target_statistics(c, v, mesh)
    expected = evaluate_variables(c, {**v, "batch_stats": stats}, open_split(c, "target", "val"), mesh)
    np.testing.assert_array_equal(np.load(tmp_path / "eval" / "confusion_matrix.npy"), expected["confusion_matrix"])
    plain = evaluate_variables(c, v, open_split(c, "target", "val"), mesh)
    assert not np.array_equal(plain["confusion_matrix"], expected["confusion_matrix"])


def _nearest_grid_reference(label, num_classes, h, w):
    """Float64 loops: every pixel to the grid point whose align-corners position is nearest."""
    height, width = label.shape
    gy, gx = np.arange(h) * (height - 1) / (h - 1), np.arange(w) * (width - 1) / (w - 1)
    out = np.zeros((num_classes, h, w))
    for y in range(height):
        for x in range(width):
            if label[y, x] < num_classes:
                out[label[y, x], np.argmin(abs(gy - y)), np.argmin(abs(gx - x))] += 1
    total = out.sum(0)
    return np.where(total > 0, out / np.maximum(total, 1), 1.0 / num_classes)


@pytest.mark.parametrize("size,grid", [((96, 192), (13, 25)), ((38, 50), (6, 9))])
def test_true_soft_labels_are_the_class_fractions_around_each_grid_point(size, grid):
    rng = np.random.default_rng(sum(size))
    label = rng.integers(0, 5, size).astype(np.uint8)
    label[rng.random(size) < 0.1] = 255          # ignore
    label[:8, :8] = 255                          # a corner with nothing but ignore: uniform there
    soft = tools.true_soft_label(label, 5, grid)
    assert soft.shape == (5, *grid) and soft.dtype == np.float32
    np.testing.assert_allclose(soft, _nearest_grid_reference(label, 5, *grid), atol=1e-6)
    np.testing.assert_allclose(soft.sum(0), 1.0, atol=1e-6)
    np.testing.assert_allclose(soft[:, 0, 0], 0.2)


def test_true_soft_labels_written_by_the_soft_label_tool(tmp_path):
    from cpsl_jax.data.pseudo_labels import PseudoLabelStore

    c = _config(6)
    c.stage = "soft_labels"
    c.data.soft_labels_from_ground_truth = True
    c.data.pseudo_labels = str(tmp_path / "soft_true")
    summary = tools.run(c, tmp_path / "w")
    assert summary["images"] == 6 and summary["from_ground_truth"]
    store, train = PseudoLabelStore(tmp_path / "soft_true"), open_split(c, "target", "train")
    for i in (0, 5):
        got = store.read_soft(train[i]["name"]).astype(np.float32)
        # A 32x64 image has a 5x9 output grid (the network's logits there).
        np.testing.assert_allclose(got, tools.true_soft_label(train[i]["label"], 19, (5, 9)), atol=1e-3)


def test_the_prototype_tool_reads_its_pixel_threshold_from_the_config(tmp_path):
    """``cpsl.prototype_min_pixels``: with a threshold above the output grid's size no image
    contributes and every prototype stays zero; with 1 every predicted class gets one."""
    c = _config(4)
    c.stage = "prototypes"
    grid = 5 * 9  # the output grid of a 32x64 image
    found = {}
    for threshold in (grid + 1, 1):
        c.cpsl.prototype_min_pixels = threshold
        c.init.prototypes = str(tmp_path / f"prototypes_{threshold}.npy")
        c.init.class_distribution = str(tmp_path / f"distribution_{threshold}.npy")
        tools.run(c, tmp_path / f"w{threshold}")
        found[threshold] = np.linalg.norm(np.load(c.init.prototypes), axis=1) > 0
        predicted = np.load(c.init.class_distribution) > 0
    assert not found[grid + 1].any()
    np.testing.assert_array_equal(found[1], predicted)
