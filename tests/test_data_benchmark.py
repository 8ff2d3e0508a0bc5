"""The host pipeline benchmark runs in quick mode and reports every timed image."""

from cpsl_jax.data import benchmark


def test_benchmark_quick_table(monkeypatch):
    monkeypatch.setattr(benchmark, "_augment_rows", lambda quick: [{"stage": "augment-stub"}])
    text = benchmark.main(["--quick"])
    lines = text.splitlines()
    assert lines[0].startswith("machine:") and "CPUs" in lines[0]
    rows = benchmark.host_rows(quick=True)
    # 4 images written per layout, all timed once.
    assert [r["images"] for r in rows] == [4, 4]
    assert all(r["images/s"] > 0 for r in rows)
    assert "host gta5" in text and "host cityscapes" in text and "augment-stub" in text
    assert "256x128" in text  # 2048x1024 / 8
