"""The data benchmark: the quick host rows count every timed image; the augmentation rows (slow)."""

import pytest

from cpsl_jax.data import benchmark


def test_benchmark_quick_table(monkeypatch):
    monkeypatch.setattr(benchmark, "augment_rows", lambda quick: [{"stage": "augment-stub"}])
    text = benchmark.main(["--quick"])
    lines = text.splitlines()
    assert lines[0].startswith("machine:") and "CPUs" in lines[0]
    rows = benchmark.host_rows(quick=True)
    # 4 images written per layout, all timed once.
    assert [r["images"] for r in rows] == [4, 4]
    assert all(r["images/s"] > 0 for r in rows)
    assert "host gta5" in text and "host cityscapes" in text and "augment-stub" in text
    assert "256x128" in text  # 2048x1024 / 8


@pytest.mark.slow
def test_augment_rows():
    rows = benchmark.augment_rows(batch=1, quick=True)
    assert [r["stage"] for r in rows] == ["lab_transfer", "weak_view", "strong_view"]
    assert all(r["images_per_s"] > 0 for r in rows)
