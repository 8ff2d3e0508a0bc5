"""Pseudo-label store: round trips, float16 error, the 0.95 threshold, missing entries."""

import numpy as np
import pytest

from cpsl_jax.data.pseudo_labels import PseudoLabelStore, threshold_hard


def softmax(x, axis):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def test_soft_round_trip_float16(tmp_path):
    rng = np.random.default_rng(1)
    store = PseudoLabelStore(tmp_path / "soft", create=True)
    probs = {n: softmax(rng.normal(size=(19, 9, 17)) * 3, 0) for n in ("aachen_000000_000019", "b_1")}
    for n, p in probs.items():
        store.write_soft(n, p)
    again = PseudoLabelStore(tmp_path / "soft")
    assert again.names("soft") == sorted(probs)
    for n, p in probs.items():
        got = again.read_soft(n)
        assert got.dtype == np.float16 and got.shape == (19, 9, 17)
        assert np.abs(got.astype(np.float64) - p).max() < 1e-3


def test_hard_round_trip_and_threshold(tmp_path):
    rng = np.random.default_rng(2)
    store = PseudoLabelStore(tmp_path / "hard", create=True)
    label = rng.integers(0, 19, (12, 20)).astype(np.uint8)
    conf = rng.uniform(0.9, 1.0, (12, 20))
    # float16(0.95) = 0.9501953125; the next float16 up is 0.95068...: only that one passes.
    conf[0, :4] = [0.95, 0.9501, 0.9507, 0.9498]
    store.write_hard("x", label, conf)
    got, got_conf = store.read_hard("x")
    assert got.dtype == np.uint8 and got_conf.dtype == np.float16
    # Independent rule: the reference compares its float16 array with a Python 0.95.
    c16 = conf.astype(np.float16)
    expected = label.copy()
    for idx, c in np.ndenumerate(c16):
        if float(c) <= float(np.float16(0.95)):
            expected[idx] = 255
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got_conf, c16)
    assert list(got[0, :4]) == [255, 255, label[0, 2], 255]
    np.testing.assert_array_equal(store.read_hard("x", threshold=None)[0], label)
    np.testing.assert_array_equal(threshold_hard(label, conf, 0.0), label)


def test_missing_entries_name_image_and_store(tmp_path):
    store = PseudoLabelStore(tmp_path / "s", create=True)
    store.write_hard("present", np.zeros((2, 3), np.uint8), np.ones((2, 3)))
    with pytest.raises(FileNotFoundError, match=r"'absent'.*" + str(tmp_path / "s")):
        store.read_soft("absent")
    with pytest.raises(FileNotFoundError, match=r"'absent'"):
        store.read_hard("absent")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        PseudoLabelStore(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="must both be"):
        store.write_hard("bad", np.zeros((2, 3), np.uint8), np.ones((3, 2)))
    assert store.names("hard") == ["present"]


def test_reads_from_many_threads_return_every_file_intact(tmp_path):
    """The loader reads pseudo labels from a thread pool: concurrent reads of soft and hard
    labels each return their own file's contents (and never CPython's spurious AST error)."""
    from concurrent.futures import ThreadPoolExecutor

    store = PseudoLabelStore(tmp_path / "s", create=True)
    rng = np.random.default_rng(0)
    soft = {f"im{i}": rng.dirichlet(np.ones(5), (6, 7)).transpose(2, 0, 1) for i in range(40)}
    hard = {f"im{i}": (rng.integers(0, 5, (6, 7)), rng.uniform(0.9, 1.0, (6, 7))) for i in range(40)}
    for name in soft:
        store.write_soft(name, soft[name])
        store.write_hard(name, *hard[name])

    def read(name):
        return name, store.read_soft(name), store.read_hard(name, threshold=None)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(read, [n for _ in range(10) for n in soft]))
    assert len(results) == 400
    for name, s, (label, conf) in results:
        np.testing.assert_array_equal(s, soft[name].astype(np.float16))
        np.testing.assert_array_equal(label, hard[name][0])
        np.testing.assert_array_equal(conf, hard[name][1].astype(np.float16))


@pytest.mark.parametrize("threshold", [0.5, 0.9])
def test_self_training_reads_the_warmup_labels_thresholded_as_configured(tmp_path, threshold):
    """The ``self_training`` stage's target batches carry the store's hard labels with every pixel
    whose float16 confidence is not above ``data.confidence_threshold`` ignored."""
    import importlib.util
    from pathlib import Path

    from cpsl_jax.train import loop
    from cpsl_jax.train.io import open_split

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("tiny_config", root / "configs" / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(f"self_training,{tmp_path}")
    config.data.confidence_threshold = threshold
    assert config.data.pseudo_labels == f"{tmp_path}/artifacts/hard_warmup"
    store = PseudoLabelStore(config.data.pseudo_labels, create=True)
    rng = np.random.default_rng(5)
    target = open_split(config, "target", "train")
    written = {}
    for i in range(len(target)):
        item = target[i]
        label = rng.integers(0, 19, item["label"].shape).astype(np.uint8)
        conf = rng.uniform(0.0, 1.0, item["label"].shape)
        store.write_hard(item["name"], label, conf)
        written[item["name"]] = (label, conf.astype(np.float16))
    batch = next(iter(loop._train_loaders(config)["target"]))
    assert len(batch["name"]) == config.data.batch_size
    for name, got in zip(batch["name"], batch["pseudo_label"]):
        label, c16 = written[str(name)]
        expected = np.where(c16.astype(np.float64) > float(np.float16(threshold)), label, 255)
        np.testing.assert_array_equal(got, expected)
        assert 0.05 < (got == 255).mean() < 0.95


def test_the_demo_scores_the_warmup_labels_class_by_class(tmp_path):
    """Recall over all pixels, and share kept and precision above the threshold, by hand."""
    from cpsl_jax.demo_properties import pseudo_label_quality

    truth = np.array([[0, 0, 1, 1], [2, 2, 255, 1]], np.uint8)
    label = np.array([[0, 1, 1, 1], [2, 0, 2, 1]], np.uint8)
    conf = np.array([[0.95, 0.99, 0.5, 0.99], [0.99, 0.99, 0.99, 0.2]])
    store = PseudoLabelStore(tmp_path / "hard", create=True)
    store.write_hard("a", label, conf)
    q = pseudo_label_quality([{"name": "a", "label": truth}], tmp_path / "hard", 0.9, 3)
    assert q["recall"] == [50.0, 100.0, 50.0]
    # Kept (truth classes): class 0 both pixels, class 1 one of three, class 2 both; the ignored
    # pixel is never counted. Predicted 0 among kept: (0,0) right and (1,1) wrong; 1: (0,1)
    # wrong and (0,3) right; 2: (1,0) right.
    assert q["kept"] == [100.0, 100.0 / 3, 100.0]
    assert q["precision"] == [50.0, 50.0, 100.0]
