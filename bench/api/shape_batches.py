"""Same-shaped tensors of a stream, stacked into one batch: one batched call (``torch.linalg.svd``...) for all of them.

A merge that works tensor by tensor calls a linear-algebra routine once per tensor; on small matrices (mini8's are
128 wide) the per-call cost is a large share, and on a GPU one batched call keeps the device busy. Grouping the
stream by shape, up to a byte budget per group, gives one call per group while the memory held stays near the
streaming merge's own (a group at most ``max_bytes``, and one group pending per shape).
"""

from __future__ import annotations

from typing import Hashable, Iterable, Iterator, TypeVar

import torch
from torch import Tensor

K = TypeVar("K", bound=Hashable)

# 4 MiB per batch: two of mini8's same-shaped task-vector stacks (8 tasks x 512 x 128 float32: 2 MiB per layer)
# go in one batch, and any stack of 4 MiB or more goes alone. A batch's SVD factors are held at once, so a larger
# budget lifts the merge's peak memory above the streaming bound (tests/test_streaming_merges.py measures it).
BATCH_BYTES = 4 * 2 ** 20


def same_shape_batches(items: Iterable[tuple[K, Tensor]],
                       max_bytes: int = BATCH_BYTES) -> Iterator[tuple[list[K], Tensor]]:
    """``(keys, stacked)`` with ``stacked = torch.stack([tensor of each key])``: the tensors of one shape, dtype and
    device, in stream order, as many per batch as fit in ``max_bytes`` (at least one). Each batch is yielded when
    the next tensor of its shape would not fit, the others at the end of the stream."""
    pending: dict[tuple, tuple[list[K], list[Tensor], int]] = {}
    for key, tensor in items:
        group = (tuple(tensor.shape), tensor.dtype, tensor.device)
        size = tensor.numel() * tensor.element_size()
        if group in pending and pending[group][2] + size > max_bytes:
            keys, tensors, _ = pending.pop(group)
            yield keys, _stacked(tensors)
        keys, tensors, held = pending.setdefault(group, ([], [], 0))
        keys.append(key)
        tensors.append(tensor)
        pending[group] = (keys, tensors, held + size)
    for keys, tensors, _ in pending.values():
        yield keys, _stacked(tensors)


def _stacked(tensors: list[Tensor]) -> Tensor:
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)
