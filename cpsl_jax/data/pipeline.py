"""Host input pipelines with grain: per-host sharding, workers, fixed-shape batches.

Three streams, each a ``grain.DataLoader`` over a random-access source (``open_dataset``):

* source train: shuffled, repeated, ``drop_remainder`` batches; optionally each item
  carries the CIELAB per-channel mean/std of a randomly drawn target image (the
  reference's colour transfer draws one per GTA5 image) as ``target_lab`` (2, 3)
  float32, the draw deterministic per record (grain's per-record rng).
* target train: the same, each item joined by name with its pseudo label from a
  ``PseudoLabelStore``: ``soft_label`` (C, h, w) float16, or ``pseudo_label`` (H, W)
  uint8 after the confidence threshold (resized nearest to the image if its size differs,
  as the reference resizes its stored label to the base size).
* validation: one pass, no dropping: the record list is padded to a multiple of
  (process count x batch size) with copies of real items flagged ``valid=False``, so
  every host yields the same number of full batches and every image is counted once.

Sharding is per JAX process (``grain.sharding.ShardByJaxProcess``); ``batch_size`` is the
per-host batch. The iterator of a loader (``iter(loader)``) is checkpointed with orbax
through ``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore``
(``grain.checkpoint.CheckpointHandler``); restoring continues with the exact next batches.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import grain
import numpy as np
from PIL import Image

from cpsl_jax.data.pseudo_labels import DEFAULT_THRESHOLD, PseudoLabelStore


@dataclasses.dataclass(frozen=True)
class LoaderOptions:
    """Per-host loader settings.

    batch_size: images per host and step (global batch / process count).
    worker_count: grain worker processes (0: read in the main process).
    worker_buffer_size: batches prefetched per worker.
    seed: shuffle and per-record randomness seed.
    shard_options: override of the per-JAX-process sharding (tests, custom layouts).
    read_threads: threads reading (decoding) records in each process.
    read_buffer: decoded records prefetched per process. grain's default (500) would hold
      about 4 GB of decoded 2048x1024 items per process, hence a small default.
    """

    batch_size: int
    seed: int = 0
    worker_count: int = 0
    worker_buffer_size: int = 1
    shard_options: Any = None
    read_threads: int = 4
    read_buffer: int = 16


def host_batch_size(global_batch: int, process_count: int | None = None) -> int:
    """Per-host share of ``global_batch``; raises if it does not divide evenly."""
    if process_count is None:
        import jax

        process_count = jax.process_count()
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} is not divisible by {process_count} hosts")
    return global_batch // process_count


class WithPseudoLabels:
    """Random-access source: items of ``source`` joined with their stored pseudo labels.

    kind 'soft': adds ``soft_label`` (C, h, w) float16. kind 'hard': adds ``pseudo_label``
    (H, W) uint8, pixels with float16 confidence <= float16(threshold) set to 255, resized
    (PIL nearest) to the item's image size when the stored size differs.
    """

    def __init__(self, source, store: PseudoLabelStore, kind: str = "soft",
                 threshold: float | None = DEFAULT_THRESHOLD):
        if kind not in ("soft", "hard"):
            raise ValueError(f"pseudo label kind must be 'soft' or 'hard', got {kind!r}")
        self.source, self.store, self.kind, self.threshold = source, store, kind, threshold

    def __repr__(self) -> str:
        # Stable across processes: grain checks a restored iterator against repr(data_source).
        return f"WithPseudoLabels({self.source!r}, {self.store!r}, kind={self.kind!r}, threshold={self.threshold})"

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.source[index])
        if self.kind == "soft":
            item["soft_label"] = self.store.read_soft(item["name"])
            return item
        label, _ = self.store.read_hard(item["name"], self.threshold)
        h, w = item["image"].shape[:2]
        if label.shape != (h, w):
            label = np.asarray(Image.fromarray(label).resize((w, h), Image.NEAREST))
        item["pseudo_label"] = label
        return item


class PaddedSource:
    """``source`` padded to ``length`` records; item i >= len(source) repeats item i mod n.

    Every item carries ``valid`` (bool): True exactly once per real record.
    """

    def __init__(self, source, length: int):
        if length < len(source):
            raise ValueError(f"padded length {length} < source length {len(source)}")
        self.source, self.length = source, int(length)

    def __repr__(self) -> str:
        return f"PaddedSource({self.source!r}, {self.length})"

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        item = dict(self.source[index % len(self.source)])
        item["valid"] = np.bool_(index < len(self.source))
        return item


class DrawTargetLab(grain.transforms.RandomMap):
    """Adds ``target_lab`` = stats[j] ((2, 3) float32 Lab mean and std of target image j)
    and ``target_lab_index`` = j, with j uniform, drawn from the record's own rng."""

    def __init__(self, stats: np.ndarray):
        stats = np.asarray(stats, np.float32)
        if stats.ndim != 3 or stats.shape[1:] != (2, 3):
            raise ValueError(f"target Lab statistics must be (N_target, 2, 3), got {stats.shape}")
        self.stats = stats

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        j = int(rng.integers(len(self.stats)))
        return {**element, "target_lab": self.stats[j], "target_lab_index": np.int32(j)}


def _shard_options(options: LoaderOptions, drop_remainder: bool):
    if options.shard_options is not None:
        return options.shard_options
    return grain.sharding.ShardByJaxProcess(drop_remainder=drop_remainder)


def _ensure_absl_flags_parsed() -> None:
    """grain's worker processes read an absl flag (worker profiling) whenever a profiler
    framework such as JAX is loaded; outside ``absl.app.run`` nothing has parsed the flags
    and that read raises. Mark them parsed with their defaults (a no-op under app.run)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _loader(source, options: LoaderOptions, *, train: bool,
            operations: Sequence[Any] = ()) -> grain.DataLoader:
    if options.worker_count:
        _ensure_absl_flags_parsed()
    sampler = grain.samplers.IndexSampler(
        num_records=len(source),
        shard_options=_shard_options(options, drop_remainder=True),
        shuffle=train,
        num_epochs=None if train else 1,
        seed=options.seed,
    )
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[*operations, grain.transforms.Batch(options.batch_size, drop_remainder=True)],
        worker_count=options.worker_count,
        worker_buffer_size=options.worker_buffer_size,
        read_options=grain.ReadOptions(num_threads=options.read_threads,
                                       prefetch_buffer_size=options.read_buffer),
    )


def source_train_loader(source, options: LoaderOptions,
                        target_lab: np.ndarray | None = None) -> grain.DataLoader:
    """Shuffled, repeated source batches ``{'image' (B,H,W,3) uint8, 'label' (B,H,W) uint8,
    'name' (B,)}``, plus ``target_lab`` (B, 2, 3) float32 when ``target_lab`` (N_target, 2, 3)
    is given."""
    ops = [DrawTargetLab(target_lab)] if target_lab is not None else []
    return _loader(source, options, train=True, operations=ops)


def target_train_loader(source, options: LoaderOptions, store: PseudoLabelStore | None = None,
                        kind: str = "soft",
                        threshold: float | None = DEFAULT_THRESHOLD) -> grain.DataLoader:
    """Shuffled, repeated target batches, joined with pseudo labels from ``store`` when given
    (``soft_label`` (B, C, h, w) float16 or ``pseudo_label`` (B, H, W) uint8)."""
    if store is not None:
        source = WithPseudoLabels(source, store, kind, threshold)
    return _loader(source, options, train=True)


def val_loader(source, options: LoaderOptions, process_count: int | None = None
               ) -> grain.DataLoader:
    """One ordered pass of full batches with a ``valid`` (B,) bool mask; nothing dropped.

    ``process_count`` (default: the shard count of ``options.shard_options``, else
    ``jax.process_count()``) sets the padding so that all hosts get equal shards.
    """
    if process_count is None:
        if options.shard_options is not None:
            process_count = options.shard_options.shard_count
        else:
            import jax

            process_count = jax.process_count()
    chunk = process_count * options.batch_size
    padded = -(-len(source) // chunk) * chunk
    return _loader(PaddedSource(source, padded), options, train=False)
