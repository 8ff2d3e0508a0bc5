"""grain pipelines: shuffling/repeat, sharding, pseudo-label join, Lab draw, val padding,
and exact resume of the iterator through orbax (in-process and with 2 worker processes)."""

import collections
import dataclasses
import os

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from cpsl_jax.data import open_dataset
from cpsl_jax.data.pipeline import (LoaderOptions, source_train_loader, target_train_loader,
                                    val_loader)
from cpsl_jax.data.pseudo_labels import PseudoLabelStore

W, H, N = 16, 8, 7


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("cs")
    rng = np.random.default_rng(0)
    for k in range(N):
        name = f"city_{k:06d}_000019"
        for path, arr, mode in (
            (f"{root}/leftImg8bit/train/city/{name}_leftImg8bit.png",
             rng.integers(0, 256, (H, W, 3), dtype=np.uint8), None),
            (f"{root}/gtFine/train/city/{name}_gtFine_labelIds.png",
             rng.integers(0, 34, (H, W), dtype=np.uint8), "L"),
        ):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.fromarray(arr, mode).save(path)
    return open_dataset("cityscapes", root, "train", 19, base_size=(W, H))


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_source_train_shuffles_repeats_and_batches(cityscapes):
    it = iter(source_train_loader(cityscapes, LoaderOptions(batch_size=2, seed=3)))
    batches = take(it, N)  # 14 items = two full epochs
    assert batches[0]["image"].shape == (2, H, W, 3) and batches[0]["image"].dtype == np.uint8
    assert batches[0]["label"].shape == (2, H, W) and batches[0]["label"].dtype == np.uint8
    names = [str(n) for b in batches for n in b["name"]]
    all_names = sorted(cityscapes.names)
    assert sorted(names[:N]) == all_names and sorted(names[N:]) == all_names
    assert names[:N] != sorted(names[:N]) or names[N:] != names[:N]  # shuffled
    # The batch content is the reader's item for that name.
    index = {n: i for i, n in enumerate(cityscapes.names)}
    item = cityscapes[index[names[0]]]
    np.testing.assert_array_equal(batches[0]["image"][0], item["image"])
    np.testing.assert_array_equal(batches[0]["label"][0], item["label"])


def test_host_shards_are_disjoint(cityscapes):
    seen = []
    for shard in range(2):
        opts = LoaderOptions(batch_size=1, seed=5,
                             shard_options=grain.sharding.ShardOptions(shard, 2, drop_remainder=True))
        seen.append({str(b["name"][0]) for b in take(iter(source_train_loader(cityscapes, opts)), 6)})
    assert not seen[0] & seen[1] and len(seen[0]) == len(seen[1]) == 3


def test_target_lab_draw_is_deterministic_per_record(cityscapes):
    stats = np.random.default_rng(1).normal(size=(5, 2, 3)).astype(np.float32)
    opts = LoaderOptions(batch_size=2, seed=11)
    a = take(iter(source_train_loader(cityscapes, opts, target_lab=stats)), 4)
    b = take(iter(source_train_loader(cityscapes, opts, target_lab=stats)), 4)
    idx = np.concatenate([x["target_lab_index"] for x in a])
    np.testing.assert_array_equal(idx, np.concatenate([x["target_lab_index"] for x in b]))
    assert len(set(idx.tolist())) > 1
    for x in a:
        assert x["target_lab"].dtype == np.float32 and x["target_lab"].shape == (2, 2, 3)
        np.testing.assert_array_equal(x["target_lab"], stats[x["target_lab_index"]])


def test_target_joined_with_soft_and_hard_pseudo_labels(cityscapes, tmp_path):
    rng = np.random.default_rng(4)
    store = PseudoLabelStore(tmp_path / "pl", create=True)
    soft, hard = {}, {}
    for n in cityscapes.names:
        soft[n] = rng.dirichlet(np.ones(19), size=(3, 5)).transpose(2, 0, 1)
        store.write_soft(n, soft[n])
        # Stored at half the image size: the join resizes it (nearest) onto the image.
        hard[n] = (rng.integers(0, 19, (H // 2, W // 2)).astype(np.uint8), rng.uniform(0.9, 1, (H // 2, W // 2)))
        store.write_hard(n, *hard[n])
    for batch in take(iter(target_train_loader(cityscapes, LoaderOptions(batch_size=3), store, "soft")), 3):
        assert batch["soft_label"].shape == (3, 19, 3, 5) and batch["soft_label"].dtype == np.float16
        for name, s in zip(batch["name"], batch["soft_label"]):
            assert np.abs(s.astype(np.float64) - soft[str(name)]).max() < 1e-3
    for batch in take(iter(target_train_loader(cityscapes, LoaderOptions(batch_size=3), store, "hard")), 3):
        assert batch["pseudo_label"].shape == (3, H, W)
        for name, got in zip(batch["name"], batch["pseudo_label"]):
            label, conf = hard[str(name)]
            masked = np.where(conf.astype(np.float16) > np.float16(0.95), label, 255)
            np.testing.assert_array_equal(got, masked.repeat(2, 0).repeat(2, 1))
    store_missing = PseudoLabelStore(tmp_path / "empty", create=True)
    with pytest.raises(FileNotFoundError, match="no pseudo label for image"):
        next(iter(target_train_loader(cityscapes, LoaderOptions(batch_size=1), store_missing)))


@pytest.mark.parametrize("batch_size,hosts", [(3, 2), (2, 1), (7, 1), (4, 3)])
def test_val_padding_counts_every_image_once(cityscapes, batch_size, hosts):
    counts = collections.Counter()
    per_host = []
    for shard in range(hosts):
        opts = LoaderOptions(batch_size=batch_size,
                             shard_options=grain.sharding.ShardOptions(shard, hosts, drop_remainder=True))
        batches = list(iter(val_loader(cityscapes, opts)))
        per_host.append(len(batches))
        for b in batches:
            assert b["image"].shape == (batch_size, H, W, 3) and b["valid"].dtype == np.bool_
            counts.update(str(n) for n in b["name"][b["valid"]])
    assert counts == collections.Counter(cityscapes.names)
    assert len(set(per_host)) == 1  # every host runs the same number of steps


@pytest.mark.parametrize("workers", [0, 2])
def test_iterator_resume_through_orbax_is_exact(cityscapes, tmp_path, workers):
    stats = np.random.default_rng(2).normal(size=(4, 2, 3)).astype(np.float32)
    opts = LoaderOptions(batch_size=2, seed=7, worker_count=workers)
    it = iter(source_train_loader(cityscapes, opts, target_lab=stats))
    take(it, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_handlers={"data": grain.checkpoint.CheckpointHandler()}) as mngr:
        mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = take(it, 5)  # crosses an epoch boundary (N = 7)
    fresh = iter(source_train_loader(cityscapes, opts, target_lab=stats))
    with ocp.CheckpointManager(tmp_path / "ckpt", item_handlers={"data": grain.checkpoint.CheckpointHandler()}) as mngr:
        restored = mngr.restore(3, args=ocp.args.Composite(
            data=grain.checkpoint.CheckpointRestore(fresh)))["data"]
    got = take(restored, 5)
    for e, g in zip(expected, got):
        assert e.keys() == g.keys()
        for k in e:
            np.testing.assert_array_equal(e[k], g[k])
    # A fresh iterator starts elsewhere: the restore did something.
    first = next(iter(source_train_loader(cityscapes, dataclasses.replace(opts, worker_count=0),
                                          target_lab=stats)))
    assert list(first["name"]) != list(expected[0]["name"]) or not np.array_equal(
        first["target_lab_index"], expected[0]["target_lab_index"])
