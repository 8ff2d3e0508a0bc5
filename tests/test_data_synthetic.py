"""Tests of the synthetic domain-shift benchmark (cpsl_jax.synthetic)."""

import os

import numpy as np
import pytest
from PIL import Image

from cpsl_jax import synthetic
from cpsl_jax.data import layouts
from cpsl_jax.synthetic import SyntheticDataset, style, write_layout

# Written out independently of the module: Cityscapes label id -> train id (19 classes),
# as in cityscapesScripts' labels.py; every other id is ignored.
CITYSCAPES_ID_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
                          23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
ID_TO_TRAIN_16 = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 23: 9, 24: 10,
                  25: 11, 26: 12, 28: 13, 32: 14, 33: 15}
ROAD, BUILDING, VEGETATION, SKY = 0, 2, 8, 10
PERSON, RIDER, CAR, TRUCK, TRAIN, MOTORCYCLE, BICYCLE = 11, 12, 13, 14, 16, 17, 18


def _ids_to_train(ids, table):
    out = np.full(ids.shape, 255, np.uint8)
    for label_id, train_id in table.items():
        out[ids == label_id] = train_id
    return out


@pytest.fixture(scope='module')
def samples():
    """80 full-size items of each domain: labels and images (about 1 s)."""
    out = {}
    for domain in ('source', 'target'):
        ds = SyntheticDataset(domain, 'train', seed=1)
        items = [ds[i] for i in range(80)]
        out[domain] = (np.stack([it['image'] for it in items]),
                       np.stack([it['label'] for it in items]))
    return out


@pytest.mark.parametrize('domain', ['source', 'target'])
def test_deterministic_and_seed_dependent(domain):
    a = synthetic.SyntheticDataset(domain, 'train', seed=3, size=(64, 128))[5]
    b = synthetic.SyntheticDataset(domain, 'train', seed=3, size=(64, 128))[5]
    c = SyntheticDataset(domain, 'train', seed=4, size=(64, 128))[5]
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
    assert a['name'] == b['name']
    assert not np.array_equal(a['image'], c['image'])
    assert not np.array_equal(a['label'], c['label'])


def test_splits_and_domains_differ():
    kw = dict(seed=0, size=(64, 128))
    train = SyntheticDataset('target', 'train', **kw)[0]['label']
    val = SyntheticDataset('target', 'val', **kw)[0]['label']
    src = SyntheticDataset('source', 'train', **kw)[0]['label']
    assert not np.array_equal(train, val)
    assert not np.array_equal(train, src)


def test_item_independent_of_access_order():
    ds = SyntheticDataset('target', 'val', seed=2, size=(64, 128))
    alone = SyntheticDataset('target', 'val', seed=2, size=(64, 128))[7]
    for i in (9, 0, 3, 8, 6):  # generate other items first, out of order
        ds[i]
    again = ds[7]
    np.testing.assert_array_equal(alone['image'], again['image'])
    np.testing.assert_array_equal(alone['label'], again['label'])
    np.testing.assert_array_equal(ds[-1]['label'], ds[len(ds) - 1]['label'])


@pytest.mark.parametrize('domain,split,length', [('source', 'train', 400),
                                                 ('target', 'train', 200),
                                                 ('target', 'val', 50)])
def test_shapes_dtypes_lengths(domain, split, length):
    ds = SyntheticDataset(domain, split)
    assert len(ds) == length
    item = ds[0]
    assert item['image'].shape == (128, 256, 3) and item['image'].dtype == np.uint8
    assert item['label'].shape == (128, 256) and item['label'].dtype == np.uint8
    assert isinstance(item['name'], str) and item['name']
    assert set(np.unique(item['label'])) <= set(range(19)) | {255}
    small = SyntheticDataset(domain, split, size=(40, 72), length=3)
    assert len(small) == 3
    assert small[2]['image'].shape == (40, 72, 3) and small[2]['label'].shape == (40, 72)
    with pytest.raises(IndexError):
        small[3]


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match='domain'):
        SyntheticDataset('gta', 'train')
    with pytest.raises(ValueError, match='split'):
        SyntheticDataset('source', 'test')
    with pytest.raises(ValueError, match='num_classes'):
        SyntheticDataset('source', 'train', num_classes=7)
    with pytest.raises(ValueError, match='layout'):
        write_layout(SyntheticDataset('source', 'train', length=1, size=(32, 64)), '/nonexistent',
                     'synthia')


def test_all_classes_long_tailed(samples):
    for domain in ('source', 'target'):
        labels = samples[domain][1]
        freq = np.bincount(labels.ravel(), minlength=256)[:19] / labels.size
        frequent = freq[[ROAD, BUILDING, VEGETATION, SKY]]
        rare = freq[[TRAIN, MOTORCYCLE, RIDER, BICYCLE]]
        assert frequent.min() > 4 * rare.max(), (domain, freq)
        assert frequent.min() > 0.03
    both = np.concatenate([samples['source'][1], samples['target'][1]])
    present = np.bincount(both.ravel(), minlength=256)[:19] > 0
    assert present.all(), np.flatnonzero(~present)


def test_class_frequencies_shift(samples):
    """The target has more vegetation and people and fewer cars than the source."""
    f = {d: np.bincount(samples[d][1].ravel(), minlength=256)[:19] / samples[d][1].size
         for d in samples}
    assert f['target'][VEGETATION] > 1.3 * f['source'][VEGETATION]
    assert f['target'][PERSON] > 1.2 * f['source'][PERSON]
    assert f['target'][CAR] < 0.85 * f['source'][CAR]


def test_ignore_is_a_thin_bottom_strip(samples):
    for domain in ('source', 'target'):
        labels = samples[domain][1]
        rows = np.nonzero(labels == 255)[1]
        assert (labels == 255).mean() < 0.08
        if rows.size:
            assert rows.min() >= int(0.85 * labels.shape[1])


def test_source_labels_follow_drawn_edges(samples):
    """Source is flat-shaded: a label change between neighbours is a colour change."""
    image, label = samples['source']
    for axis in (1, 2):
        lab_edge = np.diff(label.astype(np.int16), axis=axis) != 0
        col_edge = np.abs(np.diff(image.astype(np.int16), axis=axis)).sum(-1) > 0
        assert lab_edge.sum() > 1000
        assert (col_edge[lab_edge]).mean() > 0.99


def _class_stats(image, label):
    img = image.reshape(-1, 3).astype(np.float64)
    lab = label.ravel()
    means = np.full((19, 3), np.nan)
    for c in range(19):
        sel = img[lab == c]
        if len(sel) >= 200:  # classes seen too little have no reliable mean
            means[c] = sel.mean(0)
    return means


def test_colour_statistics_differ_per_class(samples):
    ms = _class_stats(*samples['source'])
    mt = _class_stats(*samples['target'])
    ok = ~np.isnan(ms[:, 0]) & ~np.isnan(mt[:, 0])
    assert ok.sum() >= 15
    diff = np.abs(ms[ok] - mt[ok]).mean(1)
    assert np.median(diff) > 8, diff
    assert (diff > 5).mean() >= 0.6, diff
    # Not just a global colour transform: the best affine RGB map from source class
    # means to target class means leaves large per-class residuals.
    a = np.c_[ms[ok], np.ones(ok.sum())]
    coef, *_ = np.linalg.lstsq(a, mt[ok], rcond=None)
    resid = np.abs(a @ coef - mt[ok]).mean(1)
    assert resid.max() > 8 and resid.mean() > 4, resid


def test_target_has_texture_and_noise(samples):
    """Within-region pixel variation: the source is flat, the target is textured/noisy."""
    def neighbour_diffs(image, label):
        same = label[:, :, 1:] == label[:, :, :-1]
        d = np.abs(np.diff(image.astype(np.int16), axis=2)).sum(-1)
        return d[same]
    src, tgt = neighbour_diffs(*samples['source']), neighbour_diffs(*samples['target'])
    assert (src == 0).mean() > 0.9       # flat shading: equal neighbours inside regions
    assert (tgt == 0).mean() < 0.2
    assert np.median(tgt) >= 4


@pytest.mark.parametrize('layout', ['cityscapes', 'gta5'])
def test_write_layout_round_trip(tmp_path, layout):
    ds = SyntheticDataset('target', 'val', seed=5, size=(32, 64), length=3)
    pairs = write_layout(ds, str(tmp_path), layout)
    assert len(pairs) == 3
    for i, (img_path, lab_path) in enumerate(pairs):
        if layout == 'cityscapes':
            city = 'synthetic'
            assert img_path == os.path.join(
                tmp_path, 'leftImg8bit', 'val', city, f'{city}_000000_{i:06d}_leftImg8bit.png')
            assert lab_path == os.path.join(
                tmp_path, 'gtFine', 'val', city, f'{city}_000000_{i:06d}_gtFine_labelIds.png')
        else:
            assert img_path == os.path.join(tmp_path, 'images', f'{i + 1:05d}.png')
            assert lab_path == os.path.join(tmp_path, 'labels', f'{i + 1:05d}.png')
        item = ds[i]
        with Image.open(img_path) as im:
            assert im.mode == 'RGB'
            np.testing.assert_array_equal(np.asarray(im), item['image'])
        with Image.open(lab_path) as im:
            assert im.mode == 'L'
            ids = np.asarray(im)
        assert set(np.unique(ids)) <= set(CITYSCAPES_ID_TO_TRAIN) | {0}
        np.testing.assert_array_equal(_ids_to_train(ids, CITYSCAPES_ID_TO_TRAIN), item['label'])
        assert ((ids == 0) == (item['label'] == 255)).all()


@pytest.mark.parametrize('num_classes,table', [(16, ID_TO_TRAIN_16), (19, CITYSCAPES_ID_TO_TRAIN)])
def test_class_protocols(tmp_path, num_classes, table):
    ds = SyntheticDataset('target', 'train', num_classes=num_classes, seed=0, size=(64, 128),
                          length=12)
    labels = np.stack([ds[i]['label'] for i in range(len(ds))])
    assert set(np.unique(labels)) <= set(range(num_classes)) | {255}
    assert len(np.unique(labels)) >= 12
    # Classes the protocol drops are not drawn (not painted as ignore either).
    assert (labels == 255).mean() < 0.08
    pairs = write_layout(ds, str(tmp_path), 'cityscapes')
    for i in (0, 11):
        with Image.open(pairs[i][1]) as im:
            ids = np.asarray(im)
        assert set(np.unique(ids)) <= set(table) | {0}
        np.testing.assert_array_equal(_ids_to_train(ids, table), labels[i])


@pytest.mark.parametrize('layout', ['cityscapes', 'gta5'])
def test_written_layout_is_listed_by_the_readers(tmp_path, layout):
    """The project's own listing and label table find and decode what was written."""
    from cpsl_jax.data import layouts
    ds = SyntheticDataset('source', 'train', seed=9, size=(32, 64), length=2)
    write_layout(ds, str(tmp_path), layout, split='train')
    pairs = layouts.list_pairs(layout, str(tmp_path), 'train')
    assert len(pairs) == 2
    lut = layouts.label_lut(layout, 19)
    for i, pair in enumerate(pairs):
        with Image.open(pair.label) as im:
            np.testing.assert_array_equal(lut[np.asarray(im)], ds[i]['label'])


def test_cli_writes_layouts(tmp_path):
    synthetic.main(['--out', str(tmp_path / 'cs'), '--layout', 'cityscapes', '--domain',
                    'target', '--num', '2', '--size', '32', '64', '--seed', '7'])
    synthetic.main(['--out', str(tmp_path / 'gta'), '--layout', 'gta5', '--domain', 'source',
                    '--num', '2', '--size', '32', '64'])
    for split in ('train', 'val'):
        names = sorted(os.listdir(tmp_path / 'cs' / 'gtFine' / split / 'synthetic'))
        assert names == [f'synthetic_000000_{i:06d}_gtFine_labelIds.png' for i in range(2)]
    assert sorted(os.listdir(tmp_path / 'gta' / 'images')) == ['00001.png', '00002.png']
    expected = SyntheticDataset('target', 'val', seed=7, size=(32, 64), length=2)[1]
    with Image.open(tmp_path / 'cs' / 'leftImg8bit' / 'val' / 'synthetic'
                    / 'synthetic_000000_000001_leftImg8bit.png') as im:
        np.testing.assert_array_equal(np.asarray(im), expected['image'])
    synthetic.main(['--out', str(tmp_path / 'tx'), '--layout', 'gta5', '--domain', 'target', '--splits', 'train',
                    '--num', '1', '--size', '32', '64', '--texture', '2.5', '--exposure', '0.9'])
    textured = SyntheticDataset('target', 'train', size=(32, 64), length=1, texture=2.5, exposure=0.9)[0]
    with Image.open(tmp_path / 'tx' / 'images' / '00001.png') as im:
        np.testing.assert_array_equal(np.asarray(im), textured['image'])
    with pytest.raises(SystemExit):
        synthetic.main(['--out', str(tmp_path / 'x'), '--layout', 'gta5', '--domain', 'source',
                        '--splits', 'train', 'val'])


def test_repr_is_stable_and_names_the_dataset():
    # grain validates a restored iterator against repr(data_source): it must not hold an address.
    a = synthetic.SyntheticDataset('target', 'val', seed=4, size=(32, 64), length=3)
    b = synthetic.SyntheticDataset('target', 'val', seed=4, size=(32, 64), length=3)
    assert repr(a) == repr(b) and 'target' in repr(a) and '0x' not in repr(a)
    assert repr(synthetic.SyntheticDataset('target', 'val', seed=5, size=(32, 64), length=3)) != repr(a)


def test_object_scale_widens_small_classes_only():
    """``object_scale`` enlarges people, two-wheelers, pole widths, signs, lights, walls and
    fences; the street itself (horizon, road, sky) and the vehicles stay where they were."""
    def frequencies(scale):
        ds = SyntheticDataset('source', 'train', seed=5, size=(96, 192), object_scale=scale, length=40)
        labels = np.stack([ds[i]['label'] for i in range(len(ds))])
        return np.bincount(labels.ravel(), minlength=256)[:19] / labels.size, ds

    base, _ = frequencies(1.0)
    big, ds = frequencies(2.5)
    small_classes = (3, 4, 5, 6, 7, PERSON, RIDER, MOTORCYCLE, BICYCLE)
    assert all(big[c] > 1.5 * base[c] for c in small_classes), (base, big)
    assert abs(big[CAR] - base[CAR]) < 0.2 * base[CAR]
    assert 'object_scale=2.5' in repr(ds) and 'object_scale' not in repr(SyntheticDataset('source', 'val'))
    with pytest.raises(ValueError, match='object_scale'):
        SyntheticDataset('source', 'val', object_scale=0)


def _photometric_mean(colours):
    """The mean photometric change of ``render_target`` in float64, written out channel by channel."""
    gain, sat, con = np.array([1.04, 1.0, 0.93]), 0.775, 0.86
    c = np.asarray(colours, np.float64) * gain
    grey = c.mean(-1, keepdims=True)
    return con * (sat * c + (1 - sat) * grey) + 118.0 * (1 - con)


@pytest.mark.parametrize('shift', [0.0, 0.35, 0.6, 1.0])
def test_target_palette_lands_on_the_interpolated_colour(shift):
    """After the mean photometric change each class colour sits ``shift`` of the way from its
    source colour to its photo-like tone (where no channel had to be clipped)."""
    palette = synthetic.target_palette(shift)
    source = style._SOURCE_PALETTE.astype(np.float64)
    aim = source + shift * (_photometric_mean(style._PHOTO_PALETTE) - source)
    got = _photometric_mean(palette)
    unclipped = ((palette > 0) & (palette < 255)).all(-1)
    assert unclipped.sum() >= 20
    np.testing.assert_allclose(got[unclipped], aim[unclipped], atol=0.6)  # rounding to whole levels


def test_domain_shift_moves_target_class_colours_away_from_the_source():
    """Rendered target images: each class's mean colour is farther from its source mean the
    larger ``domain_shift``; the layouts and labels do not change, and the source ignores it."""
    def class_means(ds):
        sums, counts = np.zeros((19, 3)), np.zeros(19)
        for i in range(len(ds)):
            item = ds[i]
            lab = item['label'].ravel()
            keep = lab < 19
            np.add.at(sums, lab[keep], item['image'].reshape(-1, 3)[keep].astype(np.float64))
            np.add.at(counts, lab[keep], 1)
        return sums / np.maximum(counts, 1)[:, None], counts

    kw = dict(seed=3, size=(48, 96), length=12)
    src_means, _ = class_means(SyntheticDataset('source', 'train', **kw))
    dist = {}
    for shift in (0.0, 0.35, 0.8):
        ds = SyntheticDataset('target', 'train', domain_shift=shift, **kw)
        means, counts = class_means(ds)
        seen = counts > 50
        dist[shift] = np.linalg.norm(means - src_means, axis=1)[seen].mean()
    assert dist[0.0] < dist[0.35] < dist[0.8], dist
    a = SyntheticDataset('target', 'train', domain_shift=0.8, **kw)[0]
    b = SyntheticDataset('target', 'train', **kw)[0]
    np.testing.assert_array_equal(a['label'], b['label'])
    assert np.abs(a['image'].astype(int) - b['image']).mean() > 5
    assert 'domain_shift=0.8' in repr(SyntheticDataset('target', 'val', domain_shift=0.8))
    assert 'domain_shift' not in repr(SyntheticDataset('target', 'val'))
    with pytest.raises(ValueError, match='domain_shift'):
        SyntheticDataset('target', 'val', domain_shift=1.5)


def test_texture_scales_the_targets_class_textures_only():
    """``texture`` multiplies the per-class texture amplitudes: same scenes and labels, and the
    spread of the levels inside large vegetation regions grows with it; the source ignores it."""
    kw = dict(seed=1, size=(64, 128), length=8)
    spread, plain = {}, SyntheticDataset('target', 'train', **kw)
    for t in (0.0, 1.0, 3.0):
        ds = SyntheticDataset('target', 'train', texture=t, **kw)
        stds = []
        for i in range(len(ds)):
            item = ds[i]
            veg = item['label'] == 8
            if veg.sum() > 200:
                stds.append(item['image'][veg].astype(np.float64).mean(-1).std())
            if t == 3.0:
                np.testing.assert_array_equal(item['label'], plain[i]['label'])
        spread[t] = np.mean(stds)
    assert spread[0.0] < spread[1.0] < spread[3.0], spread
    assert spread[3.0] > 1.8 * spread[1.0], spread
    src = SyntheticDataset('source', 'train', texture=3.0, **kw)[0]
    np.testing.assert_array_equal(src['image'], SyntheticDataset('source', 'train', **kw)[0]['image'])
    assert 'texture=3.0' in repr(SyntheticDataset('target', 'val', texture=3.0))
    assert 'texture' not in repr(SyntheticDataset('target', 'val'))
    with pytest.raises(ValueError, match='texture'):
        SyntheticDataset('target', 'val', texture=-1)


def test_exposure_darkens_the_target_only():
    """``exposure`` scales the target's levels before the sensor noise: same scenes and labels,
    mean level scaled by the factor (up to noise and rounding); the source ignores it."""
    kw = dict(seed=2, size=(48, 96), length=6)
    for i in range(3):
        dark = SyntheticDataset('target', 'train', exposure=0.8, **kw)[i]
        plain = SyntheticDataset('target', 'train', **kw)[i]
        np.testing.assert_array_equal(dark['label'], plain['label'])
        ratio = dark['image'].astype(np.float64).mean() / plain['image'].astype(np.float64).mean()
        assert abs(ratio - 0.8) < 0.02, ratio
    src = SyntheticDataset('source', 'train', exposure=0.8, **kw)[0]
    np.testing.assert_array_equal(src['image'], SyntheticDataset('source', 'train', **kw)[0]['image'])
    assert 'exposure=0.8' in repr(SyntheticDataset('target', 'val', exposure=0.8))
    with pytest.raises(ValueError, match='exposure'):
        SyntheticDataset('target', 'val', exposure=0)


# ----------------------------------------------------------------------------- synthetic-v2
V2_SIZE = (96, 192)


@pytest.fixture(scope='module')
def v2_frequencies():
    from cpsl_jax.synthetic import v2

    out = {}
    for domain in ('source', 'target'):
        ds = SyntheticDataset(domain, 'train', size=V2_SIZE, object_scale=v2.OBJECT_SCALE, version='v2', length=400)
        out[domain] = layouts.class_frequencies(ds[i]['label'] for i in range(len(ds)))
    return out


@pytest.mark.parametrize('domain', ['source', 'target'])
def test_v2_is_deterministic_and_seed_dependent(domain):
    a = SyntheticDataset(domain, 'train', seed=0, size=V2_SIZE, length=3, version='v2')
    b = SyntheticDataset(domain, 'train', seed=0, size=V2_SIZE, length=3, version='v2')
    c = SyntheticDataset(domain, 'train', seed=1, size=V2_SIZE, length=3, version='v2')
    for i in range(3):
        np.testing.assert_array_equal(a[i]['image'], b[i]['image'])
        np.testing.assert_array_equal(a[i]['label'], b[i]['label'])
        assert not np.array_equal(a[i]['image'], c[i]['image'])
    v1 = SyntheticDataset(domain, 'train', seed=0, size=V2_SIZE, length=3)
    assert not np.array_equal(a[0]['image'], v1[0]['image'])
    assert 'v2' in repr(a) and 'v2' not in repr(v1)


def test_v2_source_is_flat_and_its_labels_follow_the_drawn_edges():
    """The v2 source paints each instance one flat colour: inside an instance no colour edge,
    and a label edge is a colour edge."""
    ds = SyntheticDataset('source', 'train', size=V2_SIZE, length=6, version='v2', object_scale=3.0)
    lab_edges = col_edges = flat = 0
    for i in range(len(ds)):
        image, label = ds[i]['image'].astype(np.int16), ds[i]['label'].astype(np.int16)
        for axis in (0, 1):
            lab_edge = np.diff(label, axis=axis) != 0
            col_edge = np.abs(np.diff(image, axis=axis)).sum(-1) > 0
            lab_edges += lab_edge.sum()
            col_edges += col_edge[lab_edge].sum()
            flat += (~col_edge[~lab_edge]).mean() / 12
    assert lab_edges > 1000 and col_edges / lab_edges > 0.99
    assert flat > 0.9  # most neighbours of one class share their colour (parts such as windows differ)


def test_v2_target_follows_the_cityscapes_distribution(v2_frequencies):
    """Every class of the target is within a factor of 2 of its Cityscapes frequency, riders
    excepted (within a factor of 8: the vehicles around them cover them), over 400 images."""
    from cpsl_jax.synthetic import v2

    design = np.asarray(v2.CITYSCAPES_DISTRIBUTION)
    ratio = v2_frequencies['target'] / design
    others = [c for c in range(19) if c != RIDER]
    assert np.all((ratio[others] > 0.5) & (ratio[others] < 2.0)), np.round(ratio, 2)
    assert 1 / 8 < ratio[RIDER] < 2.0, ratio[RIDER]
    # A long tail: the seven rarest classes together hold under 2% of the pixels.
    assert np.sort(v2_frequencies['target'])[:7].sum() < 0.02


def test_v2_source_shifts_the_class_prior_like_gta5(v2_frequencies):
    """The source has more sky and trucks and fewer people and less vegetation; the target's
    rarest third is as rare in the source or rarer."""
    src, tgt = v2_frequencies['source'], v2_frequencies['target']
    assert src[SKY] > 1.5 * tgt[SKY] and src[TRUCK] > 1.5 * tgt[TRUCK]
    assert src[PERSON] < 0.6 * tgt[PERSON] and src[VEGETATION] < 0.7 * tgt[VEGETATION]
    rare = np.argsort(tgt)[:7]
    assert np.all(src[rare] <= 1.1 * tgt[rare]), (rare, np.round(src[rare] / tgt[rare], 2))


def test_v2_shift_is_class_conditional():
    """No single per-channel affine map takes the source's class colours to the target's: fitted
    on the class means, it leaves several classes far off. And object classes vary in colour
    from instance to instance in the target, not in the source."""
    stats = {}
    for domain in ('source', 'target'):
        ds = SyntheticDataset(domain, 'train', size=V2_SIZE, object_scale=3.0, version='v2', length=60)
        imgs = np.stack([ds[i]['image'] for i in range(len(ds))]).reshape(-1, 3).astype(np.float64)
        labs = np.stack([ds[i]['label'] for i in range(len(ds))]).ravel()
        stats[domain] = {c: imgs[labs == c] for c in range(19) if (labs == c).sum() > 300}
    common = sorted(set(stats['source']) & set(stats['target']))
    ms = np.array([stats['source'][c].mean(0) for c in common])
    mt = np.array([stats['target'][c].mean(0) for c in common])
    residual = np.zeros(len(common))
    for ch in range(3):
        a, b = np.polyfit(ms[:, ch], mt[:, ch], 1)
        residual += (mt[:, ch] - (a * ms[:, ch] + b)) ** 2
    residual = np.sqrt(residual)
    assert (residual > 20).sum() >= 4, dict(zip(common, np.round(residual)))
    spread = {d: np.sqrt(stats[d][CAR].var(0).sum()) for d in stats}
    assert spread['target'] > 2 * spread['source'], spread  # the source's spread is its windows and tyres


def test_v2_refuses_the_v1_knobs():
    with pytest.raises(ValueError, match='exposure.*v1 target only'):
        SyntheticDataset('target', 'train', version='v2', exposure=0.85)
    with pytest.raises(ValueError, match="version must be one of"):
        SyntheticDataset('target', 'train', version='v3')


def test_class_frequencies_count_labelled_pixels_only():
    a = np.array([[0, 0, 255], [2, 19, 2]], np.uint8)   # 19 is outside the 19 classes: not counted
    b = np.array([[2, 1]], np.uint8)
    np.testing.assert_allclose(layouts.class_frequencies([a, b], 19)[:3], [2 / 6, 1 / 6, 3 / 6])
    assert layouts.class_frequencies([a, b], 19)[3:].sum() == 0
