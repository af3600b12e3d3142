"""Weights: a name -> tensor mapping with the arithmetic of task vectors.

``theta_0 + 0.3 * sum(task_vectors)`` reads as in the papers: ``+``, ``-``, scalar ``*`` and
``/`` act tensor-wise, and ``sum()`` works because ``0 + w`` is ``w``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, NamedTuple

import torch
from torch import Tensor


class Weights(dict):
    """A state dict (name -> tensor) supporting +, -, scalar * and /, and ``map``."""

    def _zip(self, other, op: Callable[[Tensor, Tensor], Tensor]) -> "Weights":
        if isinstance(other, Streamed):   # the streamed side builds the expression (its reflected operator)
            return NotImplemented
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


# ---------------------------------------------------------------------------------------------------------------
# Streamed weight arithmetic: written as whole-model math, evaluated by the context one tensor at a time


class Streamed(Mapping):
    """Weight arithmetic over the experts that the context evaluates one tensor at a time.

    ``ctx.task_vectors()`` hands out streamed task vectors: ``theta_0 + 0.3 * sum(task_vectors)`` builds an
    expression, and ``ctx.shared_model`` (or ``ctx.evaluate``) computes it key by key from one tensor of each
    expert at a time, so that the merge holds about one extra model (its result) instead of one per task. The
    elementwise operations are those of the whole-model form, in the same order, hence the same bits.

    ``stack(task_vectors)`` is the ``[T, n]`` matrix of the flattened task vectors (one row per task, as
    ``torch.stack([tv.flatten() for tv in tvs])``) for rules written on that matrix: elementwise operations,
    ``sum(0)`` over the tasks, ``kthvalue(rank, dim=1, keepdim=True)`` (each row's k-th value over the whole
    model, one row at a time) and ``sum()`` (a whole-model total) work as on the tensor; the last two are global,
    so the context computes them first in passes of their own.

    Read as a mapping (``tv[key]``, ``.items()``, ``.flatten()``...), a non-stacked expression is computed whole
    once and then behaves as the :class:`Weights` it equals (new tensors: the caller may edit them). An
    expression is computed when it is used, so do not modify its operands in place before.
    """

    def __init__(self, ctx, op: Callable, args: tuple = (), kwargs: dict | None = None, *, leaf: str = "",
                 task: str | None = None, stacked: bool = False, rowwise: bool = True):
        self._ctx, self._op, self._args, self._kwargs = ctx, op, args, kwargs or {}
        self._leaf, self._task = leaf, task      # leaf: "pretrained", "expert", "task_vector", "weights", "rows"
        self.stacked, self._rowwise = stacked, rowwise
        self._weights: Weights | None = None     # the whole computed model, once read as a mapping

    # ------------------------------------------------------------ building expressions
    def _apply(self, fn: Callable, *args, stacked: bool | None = None, rowwise: bool = True, **kwargs) -> "Streamed":
        args = tuple(self._constant(a) if isinstance(a, dict) else a for a in args)
        nodes = [a for a in (self, *args) if isinstance(a, Streamed)]   # a per-model one broadcasts over a stack
        return Streamed(self._ctx, fn, (self, *args), kwargs,
                        stacked=any(n.stacked for n in nodes) if stacked is None else stacked,
                        rowwise=rowwise and all(n._rowwise for n in nodes))

    def _constant(self, weights: dict) -> "Streamed":
        """A given model (theta_0, a computed one) as a leaf of the expression."""
        leaf = Streamed(self._ctx, None, leaf="weights")
        leaf._weights = weights
        return leaf

    def __add__(self, other):
        return self._apply(torch.add, other)

    def __radd__(self, other):  # sum() starts from 0; addition commutes exactly
        if isinstance(other, (int, float)) and other == 0:
            return self
        return self._apply(torch.add, other)

    def __sub__(self, other):
        return self._apply(torch.sub, other)

    def __rsub__(self, other):
        return self._apply(lambda a, b: torch.sub(b, a) if isinstance(b, Tensor) else torch.rsub(a, b), other)

    def __mul__(self, other):
        return self._apply(torch.mul, other)

    def __rmul__(self, other):  # scalar * weights: multiplication commutes exactly
        return self._apply(torch.mul, other)

    def __truediv__(self, other):
        return self._apply(torch.div, other)

    def __neg__(self):
        return self._apply(torch.neg)

    def __ge__(self, other):
        return self._apply(torch.ge, other)

    def __gt__(self, other):
        return self._apply(torch.gt, other)

    def __le__(self, other):
        return self._apply(torch.le, other)

    def __lt__(self, other):
        return self._apply(torch.lt, other)

    def __ne__(self, other):
        return self._apply(torch.ne, other)

    def __eq__(self, other):
        return self._apply(torch.eq, other)

    __hash__ = object.__hash__

    def abs(self):
        return self._apply(torch.abs)

    def sign(self):
        return self._apply(torch.sign)

    def clamp(self, min=None, max=None):
        return self._apply(torch.clamp, min=min, max=max)

    def where(self, condition, other):
        """``condition ? self : other``, as ``Tensor.where``."""
        return self._apply(lambda x, c, o: torch.where(c, x, o), condition, other)

    def clone(self):
        return self._apply(torch.clone)

    @property
    def shape(self) -> torch.Size:
        """As the flattened form: ``[T, n]`` stacked, else ``[n]`` (n: the model's number of weights)."""
        n = self._ctx.pretrained_weights.numel()
        return torch.Size([len(self._ctx.tasks), n] if self.stacked else [n])

    def sum(self, dim: int | None = None):
        """``sum(0)``: over the tasks of a stacked expression (per tensor); ``sum()``: the whole model's total,
        computed now in a pass of its own (a 0-dim tensor)."""
        if dim is None:
            return self._ctx.evaluate_total(self)
        if dim != 0 or not self.stacked:
            raise ValueError("a streamed expression sums over the tasks (sum(0) of a stack) or over everything")
        return self._apply(torch.sum, 0, stacked=False, rowwise=False)

    def kthvalue(self, rank: int, dim: int = 1, keepdim: bool = True):
        """Each row's rank-th smallest value over the whole model (``.values``: ``[T, 1]`` as a streamed
        expression), computed now, one row at a time (needs an expression that works row by row)."""
        if not (self.stacked and dim == 1 and keepdim):
            raise ValueError("a streamed k-th value is per row of a stack: kthvalue(rank, dim=1, keepdim=True)")
        values = self._ctx.evaluate_row_kth(self, rank)
        return KthValue(Streamed(self._ctx, lambda env, out=None: values[env.rows].view(
            len(env.rows), *[1] * env.theta0.dim()), leaf="rows", stacked=True), values)

    # ------------------------------------------------------------ read as the Weights it equals
    def _computed(self) -> Weights:
        if self.stacked:
            raise TypeError("a stacked [T, n] expression is read per tensor; merge it into one model first")
        if self._weights is None:
            self._weights = self._ctx.evaluate(self)
        return self._weights

    def __getitem__(self, key):
        return self._computed()[key]

    def __setitem__(self, key, value):
        self._computed()[key] = value

    def __iter__(self):
        return iter(self._ctx.pretrained_weights)

    def __len__(self):
        return len(self._ctx.pretrained_weights)

    def __getattr__(self, name):   # Weights' own methods (flatten, map, to, numel, ...) on the computed model
        if name.startswith("_") or not hasattr(Weights, name):
            raise AttributeError(name)
        return getattr(self._computed(), name)


class KthValue(NamedTuple):
    """What ``Streamed.kthvalue`` returns: ``values`` to compare with the stack, ``per_row`` the [T] values."""
    values: Streamed
    per_row: Tensor


def stack(expressions: list[Streamed]) -> Streamed:
    """The ``[T, n]`` stack of streamed per-model expressions (a row each), as ``torch.stack`` of their flattenings."""
    if not expressions or any(not isinstance(e, Streamed) or e.stacked for e in expressions):
        raise TypeError("stack() takes a list of streamed per-model expressions (e.g. ctx.task_vectors().values())")
    return Streamed(expressions[0]._ctx, _stack_rows, tuple(expressions), stacked=True)


def _stack_rows(*rows: Tensor) -> Tensor:
    return rows[0].unsqueeze(0) if len(rows) == 1 else torch.stack(rows)


# operations that may write into their first operand when it is a temporary of the evaluation read by no one else
_IN_PLACE = {torch.abs, torch.sign, torch.neg, torch.clamp, torch.add, torch.sub, torch.mul, torch.div}


class _Env:
    """One key's tensors during an evaluation (theta_0's, each read expert's), the stack rows evaluated and, when
    the evaluation goes by cache-sized parts, the part (``view`` cuts any other tensor of this key to it)."""

    def __init__(self, key: str, theta0: Tensor, experts: dict[str, Tensor], rows: list[int],
                 part: slice | None = None):
        self.key, self.theta0, self.experts, self.rows, self.part = key, theta0, experts, rows, part

    def view(self, tensor: Tensor) -> Tensor:
        return tensor if self.part is None else tensor.reshape(-1)[self.part]


class Plan:
    """An expression compiled for evaluation at every key: its nodes in order (children first), each node's operands
    (slots of earlier results or constants), the results it is the last to read (dropped then) and whether it may
    write into its first operand; with ``rows``, the stacks read only those rows (and the plan only what they
    need)."""

    def __init__(self, root: Streamed, rows: list[int] | None = None):
        self.root, self.rows, self.tasks = root, rows, set()
        order, slot = [], {}

        def visit(node):
            if id(node) in slot:
                return
            if node._weights is None:
                if node._task is not None:
                    self.tasks.add(node._task)
                for a in self.inputs(node, rows):
                    if isinstance(a, Streamed):
                        visit(a)
            slot[id(node)] = len(order)
            order.append(node)

        visit(root)
        self.order = order
        self.stacked = any(n.stacked for n in order)   # works on stacks of T rows (worth a thread per part)
        last_reader = {}
        for i, node in enumerate(order):
            if node._weights is None and not node._leaf:
                for a in self.inputs(node, rows):
                    if isinstance(a, Streamed):
                        last_reader[slot[id(a)]] = i
        owned = [False] * len(order)   # results of the evaluation itself (not theta_0, experts or given models)
        self.steps = []
        for i, node in enumerate(order):
            if node._weights is not None:
                self.steps.append((0, node, None, (), ()))
                continue
            if node._leaf:
                owned[i] = node._leaf == "task_vector"
                self.steps.append((1, node, None, (), ()))
                continue
            args = self.inputs(node, rows)
            operands = tuple((True, slot[id(a)]) if isinstance(a, Streamed) else (False, a) for a in args)
            frees = tuple(sorted({j for is_node, j in operands if is_node and last_reader[j] == i}))
            first_node, first = operands[0]
            in_place = (node._op in _IN_PLACE and first_node and owned[first] and first in frees
                        and sum(1 for o in operands if o == operands[0]) == 1)
            owned[i] = not (node._op is _stack_rows and len(args) == 1 and not (first_node and owned[first]))
            self.steps.append((2, node, in_place, operands, frees))
        self.owned = owned
        self._spare = threading.local()   # by parts, per thread: results no longer read, reused by the leaves

    @staticmethod
    def inputs(node: Streamed, rows: list[int] | None) -> tuple:
        return node._args if node._op is not _stack_rows or rows is None else tuple(node._args[i] for i in rows)

    @staticmethod
    def _fits(first: Tensor, operands: list) -> bool:
        """Whether an elementwise result has the first operand's shape and dtype (so it can be written into it)."""
        for o in operands[1:]:
            if o is None:
                continue
            if torch.result_type(first, o) != first.dtype:
                return False
            if isinstance(o, Tensor):
                if o.dim() > first.dim() or any(a != b and a != 1 for a, b in zip(reversed(o.shape),
                                                                                  reversed(first.shape))):
                    return False
        return True

    def tasks_read(self) -> list[str]:
        """The experts this plan reads, in the context's task order."""
        return [t for t in self.root._ctx.tasks if t in self.tasks]

    def at(self, env: _Env) -> Tensor:
        """The expression at one key (or one part of a key): each node computed once, its result dropped once its
        last reader has read it."""
        values: list = [None] * len(self.steps)
        # by parts, the results no longer read are reused (a fresh part-sized tensor costs more than the arithmetic)
        if env.part is not None:
            if not hasattr(self._spare, "by_shape"):
                self._spare.by_shape = {}
            spare = self._spare.by_shape.setdefault(env.theta0.shape, [])
        else:
            spare = None
        for i, (kind, node, in_place, operands, frees) in enumerate(self.steps):
            if kind == 0:
                values[i] = env.view(node._weights[env.key])
            elif kind == 1:
                values[i] = node._op(env, spare.pop() if spare and self.owned[i] else None)
            else:
                args = [values[j] if is_node else j for is_node, j in operands]
                written = in_place and self._fits(args[0], args)
                if written:   # the same values, without a new tensor
                    values[i] = node._op(*args, **node._kwargs, out=args[0])
                else:
                    values[i] = node._op(*args, **node._kwargs)
                for j in frees:
                    if spare is not None and self.owned[j] and not (written and j == operands[0][1]) \
                            and values[j].shape == env.theta0.shape and values[j].dtype == env.theta0.dtype:
                        spare.append(values[j])
                    values[j] = None
        return values[-1]


def kth_smallest_(values: Tensor, rank: int) -> Tensor:
    """The rank-th smallest entry (1-based) of a 1-D tensor, as ``kthvalue`` gives it, reordering ``values``.

    On the CPU numpy's in-place partition needs no extra memory; ``kthvalue`` copies the values and keeps
    int64 indices (three times the buffer), which at full model size is more than the experts' headroom.
    """
    if values.device.type != "cpu":
        return values.kthvalue(rank).values
    array = values.numpy()
    array.partition(rank - 1)
    return values.new_tensor(array[rank - 1])


# Elements per part (128 KiB of float32: a part of the result, theta_0 and a scratch stay in L2). At most torch's
# parallel grain (32,768), so each operation on a part runs on the calling thread: a part split across threads pays a
# synchronisation per operation, which on a loaded machine measured 5-10x slower than the whole-tensor operations.
CACHE_PART = 1 << 15


def map_parts(fn: Callable, parts: Iterable, parallel: bool = True) -> list:
    """``[fn(part) for part in parts]``, with ``parallel`` the parts shared among ``torch.get_num_threads()``
    threads.

    A cache-sized part is below torch's parallel grain, so each operation on it runs on the calling thread; the
    threads take turns at the interpreter between operations (torch releases it inside each). That pays where each
    operation has work enough (a stack of T task vectors' parts: TIES at one ViT-B/32 block, 2.7 s -> 1.7 s on two
    threads); on one model's parts (Task Arithmetic's sum) the turns cost more than the second core gives (1.25 s
    -> 1.7-2.0 s at twelve blocks on two shared cores), so those run on one thread."""
    threads = torch.get_num_threads()
    if threads <= 1 or not parallel:
        return [fn(part) for part in parts]
    with ThreadPoolExecutor(threads, thread_name_prefix="mergebench-parts") as pool:   # no thread outlives the call
        return list(pool.map(fn, parts))


def cache_sized_parts(out: Tensor, *inputs: Tensor):
    """Matching flat parts of ``out`` and of each input (same shape): on the CPU of ``CACHE_PART`` elements, so that
    an accumulation over T inputs reads each input from memory once while the partial result stays in the cache
    (the elementwise operations, hence the results, are those on the whole tensors); elsewhere the whole tensors."""
    flat = [t.view(-1) if t.is_contiguous() else t.reshape(-1) for t in (out, *inputs)]
    if flat[0].data_ptr() != out.data_ptr() or not out.is_contiguous():
        raise ValueError("cache_sized_parts writes into a contiguous output")
    step = CACHE_PART if out.device.type == "cpu" else max(out.numel(), 1)
    for part in part_slices(out.numel(), step):
        yield [t[part] for t in flat]


def part_slices(numel: int, step: int = CACHE_PART) -> list[slice]:
    """The consecutive slices of ``step`` elements (the last one shorter) that cover ``numel`` elements."""
    return [slice(start, min(start + step, numel)) for start in range(0, numel, step)]
