"""Colour-coding, panels and PNG writing."""

import numpy as np
import pytest
from PIL import Image

from cpsl_jax import visualize


def test_colorize_maps_each_class_and_ignore_to_black():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 19, size=(2, 7, 9)).astype(np.uint8)
    labels[rng.random(labels.shape) < 0.3] = 255
    rgb = visualize.colorize(labels)
    assert rgb.shape == (2, 7, 9, 3) and rgb.dtype == np.uint8
    for idx in np.ndindex(labels.shape):
        want = (0, 0, 0) if labels[idx] == 255 else visualize.CITYSCAPES_PALETTE[labels[idx]]
        np.testing.assert_array_equal(rgb[idx], want)
    assert len({tuple(c) for c in visualize.CITYSCAPES_PALETTE}) == 19  # colours distinct
    # A few official Cityscapes colours, written out independently.
    official = {'road': (128, 64, 128), 'sky': (70, 130, 180), 'car': (0, 0, 142), 'bicycle': (119, 11, 32)}
    for name, rgb_want in official.items():
        assert tuple(visualize.CITYSCAPES_PALETTE[visualize.CITYSCAPES_CLASSES.index(name)]) == rgb_want
    # Road is Cityscapes' purple.
    np.testing.assert_array_equal(visualize.colorize(np.zeros((1, 1), np.int32))[0, 0],
                                  (128, 64, 128))


def test_reduced_palettes_are_the_kept_classes():
    for n, dropped in [(16, {'terrain', 'truck', 'train'}),
                       (13, {'terrain', 'truck', 'train', 'wall', 'fence', 'pole'})]:
        names = visualize.class_names(n)
        assert len(names) == n and set(visualize.CITYSCAPES_CLASSES) - set(names) == dropped
        colors = visualize.palette(n)
        for name, color in zip(names, colors):
            i19 = visualize.CITYSCAPES_CLASSES.index(name)
            np.testing.assert_array_equal(color, visualize.CITYSCAPES_PALETTE[i19])
        labels = np.arange(n + 1).reshape(1, -1)
        labels[0, -1] = 255
        rgb = visualize.colorize(labels, colors)
        np.testing.assert_array_equal(rgb[0, :n], colors)
        np.testing.assert_array_equal(rgb[0, n], (0, 0, 0))
    with pytest.raises(ValueError, match='17'):
        visualize.palette(17)


def test_side_by_side_and_save_png(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, size=(5, 6, 3)).astype(np.uint8)
    b = rng.integers(0, 256, size=(3, 4)).astype(np.uint8)
    out = visualize.side_by_side([a, b], gap=2)
    assert out.shape == (5, 6 + 2 + 4, 3)
    np.testing.assert_array_equal(out[:, :6], a)
    np.testing.assert_array_equal(out[:3, 8:], np.repeat(b[..., None], 3, -1))
    assert (out[3:, 8:] == 255).all() and (out[:, 6:8] == 255).all()

    titled = visualize.side_by_side([a, b], titles=['image', 'label'], gap=2, title_height=10)
    assert titled.shape == (15, 12, 3)
    np.testing.assert_array_equal(titled[10:, :6], a)
    assert (titled[:10] != 255).any()  # the titles were drawn

    path = tmp_path / 'sub' / 'panel.png'
    visualize.save_png(str(path), out)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), out)
    with pytest.raises(ValueError, match='uint8'):
        visualize.save_png(str(path), out.astype(np.float32))
