"""Weights: a name -> tensor mapping with the arithmetic of task vectors.

``theta_0 + 0.3 * sum(task_vectors)`` reads as in the papers: ``+``, ``-``, scalar ``*`` and
``/`` act tensor-wise, and ``sum()`` works because ``0 + w`` is ``w``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


class Weights(dict):
    """A state dict (name -> tensor) supporting +, -, scalar * and /, and ``map``."""

    def _zip(self, other, op: Callable[[Tensor, Tensor], Tensor]) -> "Weights":
        if isinstance(other, Weights):
            if self.keys() != other.keys():
                diff = sorted(set(self) ^ set(other))
                raise KeyError(f"Weights have different keys (first differences: {diff[:5]})")
            return Weights({k: op(v, other[k]) for k, v in self.items()})
        return Weights({k: op(v, other) for k, v in self.items()})

    def __add__(self, other):
        return self._zip(other, torch.add)

    def __radd__(self, other):  # sum() starts from 0
        if isinstance(other, (int, float)) and other == 0:
            return self
        return self._zip(other, torch.add)

    def __sub__(self, other):
        return self._zip(other, torch.sub)

    def __mul__(self, scalar):
        return self._zip(scalar, torch.mul)

    __rmul__ = __mul__

    def __truediv__(self, scalar):
        return self._zip(scalar, torch.div)

    def __neg__(self):
        return self * -1.0

    def map(self, fn: Callable[[str, Tensor], Tensor]) -> "Weights":
        """Apply ``fn(name, tensor)`` to every tensor."""
        return Weights({k: fn(k, v) for k, v in self.items()})

    def to(self, *args, **kwargs) -> "Weights":
        return Weights({k: v.to(*args, **kwargs) for k, v in self.items()})

    def numel(self) -> int:
        return sum(v.numel() for v in self.values())

    def flatten(self) -> Tensor:
        """All tensors as one vector (in key order); ``unflatten`` inverts it."""
        return torch.cat([v.reshape(-1) for v in self.values()])

    def unflatten(self, vector: Tensor) -> "Weights":
        out, start = Weights(), 0
        for k, v in self.items():
            out[k] = vector[start:start + v.numel()].view_as(v)
            start += v.numel()
        if start != vector.numel():
            raise ValueError(f"vector has {vector.numel()} elements, these weights have {start}")
        return out
