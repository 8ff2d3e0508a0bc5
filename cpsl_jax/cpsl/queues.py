"""Fixed-size memory queues of the self-labeling and contrastive terms.

The reference keeps a feature queue F (65,536 x 256) with a label per row and an output
queue O (65,536 x C). It inserts the n new rows at the **front** and shifts the rest back,
so the oldest n rows fall off the end. Here the queue is a ring buffer with a write pointer:
the same set of rows is held at every moment, only their order differs (each pushed block
is written in reverse row order, so the ring evicts exactly the rows the front insertion
drops from the back, also when n does not divide K or varies). Order does not
matter to any consumer: Sinkhorn is equivariant to a permutation of its rows (row sums run
over all samples, column normalisation is per sample), the self-labeling targets are the new
rows' assignments, and the contrastive loss sums over queue rows. Writing n rows at a pointer
costs O(n) instead of the reference's O(K) shift.

"In use" is the reference's ``use_the_queue``: it turns on once the queue's last row is
non-zero, i.e. once K rows have been pushed, is checked per image **before** that image's
push, and stays on.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Queue:
    """Ring buffer of the last ``size`` pushed rows.

    Attributes:
      rows: (K, D) stored rows (zeros where never written).
      labels: (K,) int32 label per row, or None for a queue without labels.
      ptr: () int32 index the next row is written to.
      count: () int32 number of rows pushed so far, capped at K.
      was_in_use: () bool, the reference's ``use_the_queue`` as last checked: set by a push
        that found the queue already full. After one iteration's pushes it tells whether the
        contrastive term runs (the reference reads the flag of its last image's check).
    """

    rows: jnp.ndarray
    labels: Optional[jnp.ndarray]
    ptr: jnp.ndarray
    count: jnp.ndarray
    was_in_use: jnp.ndarray

    @property
    def size(self) -> int:
        return self.rows.shape[0]


def init_queue(size: int, dim: int, *, with_labels: bool = False, dtype=jnp.float32) -> Queue:
    """An empty queue of ``size`` rows of width ``dim`` (65,536 x 256 / x C in the paper)."""
    if size <= 0 or dim <= 0:
        raise ValueError(f"init_queue: size and dim must be positive, got size={size}, dim={dim}")
    return Queue(
        rows=jnp.zeros((size, dim), dtype),
        labels=jnp.zeros((size,), jnp.int32) if with_labels else None,
        ptr=jnp.zeros((), jnp.int32),
        count=jnp.zeros((), jnp.int32),
        was_in_use=jnp.zeros((), jnp.bool_),
    )


def in_use(queue: Queue) -> jnp.ndarray:
    """() bool: the queue is full (its last row would be non-zero in the reference's layout)."""
    return queue.count >= queue.size


def push(queue: Queue, rows: jnp.ndarray, labels: Optional[jnp.ndarray] = None) -> Queue:
    """Insert ``rows`` (n, D) (and ``labels`` (n,)); the oldest n rows leave.

    More rows than the queue holds: only the first K enter (the reference's front insertion
    puts row 0 at the front). Also records the in-use check made before this push in
    ``was_in_use``.
    """
    k = queue.size
    if rows.ndim != 2 or rows.shape[1] != queue.rows.shape[1]:
        raise ValueError(f"push: rows must be (n, {queue.rows.shape[1]}), got {rows.shape}")
    if (labels is None) != (queue.labels is None):
        raise ValueError("push: labels must be given exactly when the queue was made with_labels=True")
    if rows.shape[0] > k:
        rows = rows[:k]
        labels = None if labels is None else labels[:k]
    n = rows.shape[0]
    # Row j goes to ptr + n - 1 - j: row 0 is the newest, as at the reference's front.
    idx = (queue.ptr + n - 1 - jnp.arange(n, dtype=jnp.int32)) % k
    new_labels = queue.labels
    if labels is not None:
        new_labels = queue.labels.at[idx].set(labels.astype(jnp.int32))
    return Queue(
        rows=queue.rows.at[idx].set(rows.astype(queue.rows.dtype)),
        labels=new_labels,
        ptr=(queue.ptr + n) % k,
        count=jnp.minimum(queue.count + n, k),
        was_in_use=queue.was_in_use | in_use(queue),
    )
