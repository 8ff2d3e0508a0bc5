"""Layouts, label maps, folder readers and the TFDS round trip on tiny datasets in tmp dirs."""

import logging
import os
import sys
import types

import cv2
import numpy as np
import pytest
import scipy.io
from PIL import Image

from cpsl_jax.data import layouts, open_dataset, readers

# Independent copy of the published id lists (position = train id).
CS_TABLE = {
    19: "7 8 11 12 13 17 19 20 21 22 23 24 25 26 27 28 31 32 33",
    16: "7 8 11 12 13 17 19 20 21 23 24 25 26 28 32 33",
    13: "7 8 11 19 20 21 23 24 25 26 28 32 33",
}
SYN_TABLE = {
    19: "3 4 2 21 5 7 15 9 6 16 1 10 17 8 18 19 20 12 11",
    16: "3 4 2 21 5 7 15 9 6 1 10 17 8 19 12 11",
    13: "3 4 2 15 9 6 1 10 17 8 19 12 11",
}


def expected_train_ids(ids, table):
    """Pixel-by-pixel mapping through a dict built from the text table (no LUT)."""
    mapping = {int(v): k for k, v in enumerate(table.split())}
    out = np.empty(ids.shape, np.uint8)
    for idx, v in np.ndenumerate(ids):
        out[idx] = mapping.get(int(v), 255)
    return out


def pil_nearest(a, out_w, out_h):
    """PIL's nearest sampling written out: source index floor((i + 0.5) * in / out)."""
    h, w = a.shape[:2]
    rows = np.minimum(((np.arange(out_h) + 0.5) * h / out_h).astype(int), h - 1)
    cols = np.minimum(((np.arange(out_w) + 0.5) * w / out_w).astype(int), w - 1)
    return a[rows][:, cols]


def save_png(path, array, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    if im.mode == "P":
        im.putpalette([c for i in range(256) for c in (i, 255 - i, i // 2)])
    im.save(path)


def make_cityscapes(root, rng, per_split=3, size=(24, 12)):
    w, h = size
    originals = {}
    for split in ("train", "val"):
        for k in range(per_split):
            city = ("aachen", "bochum")[k % 2]
            name = f"{city}_{k:06d}_000019"
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            ids = rng.integers(0, 34, (h, w), dtype=np.uint8)
            save_png(f"{root}/leftImg8bit/{split}/{city}/{name}_leftImg8bit.png", img)
            save_png(f"{root}/gtFine/{split}/{city}/{name}_gtFine_labelIds.png", ids, "L")
            originals[(split, name)] = (img, ids)
    return originals


def make_gta5(root, rng, n=3, mismatched=2):
    originals = {}
    for k in range(1, n + 1):
        name = f"{k:05d}"
        ih, iw = (14, 26) if k == mismatched else (12, 24)
        img = rng.integers(0, 256, (ih, iw, 3), dtype=np.uint8)
        ids = rng.integers(0, 35, (12, 24), dtype=np.uint8)
        save_png(f"{root}/images/{name}.png", img)
        save_png(f"{root}/labels/{name}.png", ids, "P")
        originals[name] = (img, ids)
    return originals


def make_synthia(root, rng, n=2, size=(20, 12)):
    w, h = size
    originals = {}
    os.makedirs(f"{root}/GT/LABELS", exist_ok=True)
    for k in range(n):
        name = f"{k:07d}"
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ids = rng.integers(0, 23, (h, w)).astype(np.uint16)
        # 16-bit, 3 channels; OpenCV writes BGR, the class id is the first RGB channel,
        # the others hold unrelated large values (instance ids in the real data).
        bgr = np.stack([rng.integers(0, 60000, (h, w)), rng.integers(0, 60000, (h, w)), ids],
                       -1).astype(np.uint16)
        assert cv2.imwrite(f"{root}/GT/LABELS/{name}.png", bgr)
        save_png(f"{root}/RGB/{name}.png", img)
        originals[name] = (img, ids)
    return originals


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ----------------------------------------------------------------------------- label maps


@pytest.mark.parametrize("num_classes", [19, 16, 13])
def test_luts_match_independent_tables(num_classes):
    ids = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(layouts.label_lut("cityscapes", num_classes)[ids],
                                  expected_train_ids(ids, CS_TABLE[num_classes]))
    np.testing.assert_array_equal(layouts.label_lut("gta5", num_classes)[ids],
                                  expected_train_ids(ids, CS_TABLE[num_classes]))
    np.testing.assert_array_equal(layouts.label_lut("synthia", num_classes)[ids],
                                  expected_train_ids(ids, SYN_TABLE[num_classes]))
    names = layouts.class_names(num_classes)
    assert len(names) == num_classes == len(layouts.palette(num_classes))
    assert ("terrain" in names) == (num_classes == 19)
    assert ("wall" in names) == (num_classes != 13)


# ----------------------------------------------------------------------------- readers


@pytest.mark.parametrize("num_classes", [19, 16, 13])
def test_cityscapes_items_at_file_size(tmp_path, rng, num_classes):
    originals = make_cityscapes(tmp_path, rng)
    ds = open_dataset("cityscapes", tmp_path, "val", num_classes, base_size=None)
    names = sorted(n for s, n in originals if s == "val")
    assert len(ds) == len(names)
    # Sorted by (city, name): aachen before bochum.
    assert [ds[i]["name"] for i in range(len(ds))] == sorted(names, key=lambda n: (n[:6], n))
    for i in range(len(ds)):
        item = ds[i]
        img, ids = originals[("val", item["name"])]
        assert item["image"].dtype == np.uint8 and item["label"].dtype == np.uint8
        np.testing.assert_array_equal(item["image"], img)
        np.testing.assert_array_equal(item["label"], expected_train_ids(ids, CS_TABLE[num_classes]))


def test_resize_to_base_size_matches_torch_antialias_and_nearest(tmp_path, rng):
    import torch
    import torch.nn.functional as F

    originals = make_cityscapes(tmp_path, rng)
    # Scales in/out with an odd numerator keep PIL's nearest off exact ties.
    ds = open_dataset("cityscapes", tmp_path, "train", 19, base_size=(16, 8))  # shrink x1.5
    up = open_dataset("cityscapes", tmp_path, "train", 19, base_size=(40, 32))  # enlarge
    for d, (w, h) in ((ds, (16, 8)), (up, (40, 32))):
        item = d[0]
        img, ids = originals[("train", item["name"])]
        assert item["image"].shape == (h, w, 3) and item["label"].shape == (h, w)
        # PIL's bilinear (antialiased when shrinking) = torch's antialiased bilinear,
        # up to PIL's 8-bit fixed-point rounding.
        t = torch.from_numpy(img.astype(np.float64)).permute(2, 0, 1)[None]
        ref = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False,
                            antialias=True)[0].permute(1, 2, 0).numpy()
        assert np.abs(item["image"].astype(np.float64) - ref).max() <= 1.0
        np.testing.assert_array_equal(
            item["label"], pil_nearest(expected_train_ids(ids, CS_TABLE[19]), w, h))


def test_default_base_sizes(tmp_path, rng):
    make_synthia(tmp_path / "syn", rng, n=1)
    assert open_dataset("synthia", tmp_path / "syn", "train", 16)[0]["image"].shape == (760, 1280, 3)


@pytest.mark.parametrize("num_classes", [19, 16, 13])
def test_synthia_16bit_labels(tmp_path, rng, num_classes):
    originals = make_synthia(tmp_path, rng)
    ds = open_dataset("synthia", tmp_path, "train", num_classes, base_size=None)
    assert [ds[i]["name"] for i in range(len(ds))] == sorted(originals)
    for i in range(len(ds)):
        img, ids = originals[ds[i]["name"]]
        np.testing.assert_array_equal(ds[i]["image"], img)
        np.testing.assert_array_equal(ds[i]["label"], expected_train_ids(ids, SYN_TABLE[num_classes]))


def test_gta5_mismatched_pair_resized_independently_and_logged(tmp_path, rng, caplog):
    originals = make_gta5(tmp_path, rng)
    ds = open_dataset("gta5", tmp_path, "train", 19, base_size=(48, 24))
    assert [ds[i]["name"] for i in range(len(ds))] == ["00001", "00002", "00003"]
    with caplog.at_level(logging.WARNING, logger="cpsl_jax.data.decode"):
        item = ds[1]
    img, ids = originals["00002"]
    assert img.shape[:2] != ids.shape
    assert item["image"].shape == (24, 48, 3)
    np.testing.assert_array_equal(item["label"], pil_nearest(expected_train_ids(ids, CS_TABLE[19]), 48, 24))
    np.testing.assert_array_equal(item["image"], np.asarray(Image.fromarray(img).resize((48, 24), Image.BILINEAR)))
    assert "00002" in caplog.text and "26x14" in caplog.text and "24x12" in caplog.text
    assert ds.scan_sizes() == ["00002"]
    # At file size the label is brought onto the image.
    assert open_dataset("gta5", tmp_path, "train", 19, base_size=None)[1]["label"].shape == (14, 26)


def test_gta5_split_mat(tmp_path, rng):
    make_gta5(tmp_path, rng, n=4)
    with pytest.raises(FileNotFoundError, match="split.mat"):
        open_dataset("gta5", tmp_path, "val", 19)
    scipy.io.savemat(tmp_path / "split.mat", {"trainIds": np.array([[1], [3]]),
                                              "valIds": np.array([[4]]), "testIds": np.array([[2]])})
    names = lambda split: [p.name for p in layouts.list_gta5(str(tmp_path), split)]
    assert names("train") == names("all") == ["00001", "00002", "00003", "00004"]
    assert names("val") == ["00004"] and names("test") == ["00002"]


def test_errors_name_the_file(tmp_path, rng):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_dataset("cityscapes", tmp_path / "nowhere", "train", 19)
    make_cityscapes(tmp_path / "cs", rng)
    with pytest.raises(FileNotFoundError, match="leftImg8bit/test"):
        open_dataset("cityscapes", tmp_path / "cs", "test", 19)
    label = next((tmp_path / "cs/gtFine/val/aachen").glob("*.png"))
    os.remove(label)
    with pytest.raises(FileNotFoundError, match=str(label)):
        open_dataset("cityscapes", tmp_path / "cs", "val", 19)
    assert len(open_dataset("cityscapes", tmp_path / "cs", "val", 19, skip_missing=True)) == 2

    make_gta5(tmp_path / "gta", rng)
    os.remove(tmp_path / "gta/images/00003.png")
    with pytest.raises(FileNotFoundError, match="images/00003.png"):
        open_dataset("gta5", tmp_path / "gta", "train", 19)

    syn = tmp_path / "syn"
    make_synthia(syn, rng)
    bad = syn / "RGB/0000001.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # truncated
    ds = open_dataset("synthia", syn, "train", 19)
    with pytest.raises(ValueError, match="truncated image .*0000001.png"):
        ds[1]
    (syn / "GT/LABELS/0000000.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="label .*0000000.png"):
        ds[0]


def test_strict_unknown_ids(tmp_path, rng):
    make_cityscapes(tmp_path, rng, per_split=1)
    label = next((tmp_path / "gtFine/train").rglob("*.png"))
    ids = np.asarray(Image.open(label)).copy()
    ids[0, 0] = 200
    save_png(str(label), ids, "L")
    assert open_dataset("cityscapes", tmp_path, "train", 19, base_size=None)[0]["label"][0, 0] == 255
    with pytest.raises(ValueError, match=r"unknown ids \[200\]") as e:
        open_dataset("cityscapes", tmp_path, "train", 19, strict=True)[0]
    assert str(label) in str(e.value)


def test_synthetic_dispatch_is_lazy(monkeypatch):
    calls = []
    fake = types.ModuleType("cpsl_jax.synthetic")
    fake.SyntheticDataset = lambda **kw: calls.append(kw) or "ds"
    monkeypatch.setitem(sys.modules, "cpsl_jax.synthetic", fake)
    assert open_dataset("synthetic-target", None, "val", 16, size=8) == "ds"
    assert calls == [dict(domain="target", split="val", num_classes=16, size=8)]


def test_pickles_for_workers(tmp_path, rng):
    import pickle

    make_cityscapes(tmp_path, rng, per_split=1)
    ds = open_dataset("cityscapes", tmp_path, "train", 19, base_size=(8, 4))
    again = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(again[0]["label"], ds[0]["label"])


# ----------------------------------------------------------------------------- TFDS


def test_tfds_prepare_and_data_source_round_trip(tmp_path, rng):
    from cpsl_jax.data import tfds_builders

    make_cityscapes(tmp_path / "cs", rng)
    make_synthia(tmp_path / "syn", rng)
    make_gta5(tmp_path / "gta", rng)
    data_dir = tmp_path / "tfds"
    for name, root in (("cityscapes", "cs"), ("synthia", "syn"), ("gta5", "gta")):
        tfds_builders.prepare(name, tmp_path / root, data_dir)
    for name, root, split, num_classes in (("cityscapes", "cs", "val", 16), ("cityscapes", "cs", "train", 19),
                                           ("synthia", "syn", "train", 13), ("gta5", "gta", "train", 19)):
        folder = open_dataset(name, tmp_path / root, split, num_classes, base_size=(16, 8))
        records = open_dataset(name, None, split, num_classes, base_size=(16, 8), tfds_dir=data_dir)
        assert len(records) == len(folder) > 0
        for i in range(len(folder)):
            a, b = folder[i], records[i]
            assert a["name"] == b["name"]
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["label"], b["label"])
    assert (data_dir / "cpsl_cityscapes/1.0.0").is_dir()
    assert list((data_dir / "cpsl_cityscapes/1.0.0").glob("*.array_record*"))


def test_tfds_prepare_fails_on_truncated_file(tmp_path, rng):
    from cpsl_jax.data import tfds_builders

    make_synthia(tmp_path / "syn", rng)
    bad = tmp_path / "syn/RGB/0000001.png"
    bad.write_bytes(bad.read_bytes()[:60])
    with pytest.raises(Exception, match="0000001.png"):
        tfds_builders.prepare("synthia", tmp_path / "syn", tmp_path / "tfds")
    with pytest.raises(FileNotFoundError, match="not prepared"):
        open_dataset("synthia", None, "train", 19, tfds_dir=tmp_path / "empty")


def test_synthetic_through_open_dataset():
    pytest.importorskip("cpsl_jax.synthetic")
    ds = open_dataset("synthetic-source", None, "train", 16, size=(32, 48), length=2)
    item = ds[1]
    assert len(ds) == 2 and item["image"].shape == (32, 48, 3) and item["image"].dtype == np.uint8
    assert item["label"].shape == (32, 48) and set(np.unique(item["label"])) <= set(range(16)) | {255}
    assert isinstance(item["name"], str)
