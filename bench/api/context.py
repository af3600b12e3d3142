"""MergeContext: everything a method may use, and nothing it did not declare.

The harness builds one context per run, in the method's own worker process (:mod:`mergebench.engine.worker`), over
the part of the suite the method declared. A method reads the pretrained weights, the experts, the task names
and heads from it, and asks it for data only of the kind it declared (``needs``); it has no route to the suite
object. Every data access is counted so that the record says what the method used.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections import defaultdict
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor

from mergebench.api.models import MergedModel, SharedModel, encoder_from_weights, freeze
from mergebench.engine.progress import progress as _progress
from mergebench.suites.base import Suite
from mergebench.api.weights import Plan, Streamed, Weights, _Env, kth_smallest_, map_parts, part_slices
from mergebench.engine import transfer


class DataNotDeclaredError(PermissionError):
    """A method asked for data of a kind it did not declare in ``register_method(needs=...)``."""


# The precision of the test-time adaptation loops' forward and backward passes (``MergeContext.autocast``): "bf16"
# (bfloat16 autocast; the merge, the trained parameters, their optimizer and the loss in float32), "fp32"
# (everything in float32, as the official codes) or "auto" (the default): bf16 where the device multiplies bfloat16
# matrices natively, else fp32 (``resolve_precision``). Records store the resolved value.
PRECISIONS = ("auto", "bf16", "fp32")

# the splits whose labels a method that declared needs="labeled" gets (the test split's are for evaluation only)
LABELED_SPLITS = ("train", "val")


def native_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware: a CUDA GPU with bfloat16 support, or a CPU with
    AMX tiles or AVX-512 BF16. Elsewhere PyTorch emulates them: on an AVX2-only CPU a layer-wise AdaMerging step of
    mini8 measured 8.5 s in bfloat16 against 0.74 s in float32 (one thread)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        return any(getattr(cpu, probe, lambda: False)() for probe in ("_is_amx_tile_supported",
                                                                      "_is_avx512_bf16_supported"))
    return False


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """The precision a run uses on ``device``: "auto" becomes "bf16" where :func:`native_bf16`, else "fp32"."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


class MergeContext:
    def __init__(self, suite: Suite, spec, show_progress: bool = True, *, tasks: list[str] | None = None):
        """The context of the run ``spec`` (a :class:`mergebench.engine.runspec.RunSpec`: its pipeline's needs,
        device, seed, data settings and precision) over ``suite``; ``tasks``: the tasks it serves, all of the
        suite's unless a sequential step's view narrows them to those arrived so far."""
        self._source = suite  # the suite, or in a worker process the part of it the method declared
        self.spec = spec
        self.precision = resolve_precision(spec.precision, spec.device)
        self.tasks: list[str] = list(suite.tasks if tasks is None else tasks)
        self.needs = spec.call.needs()
        self.device = torch.device(spec.device)
        self.seed = spec.seed
        self.unlabeled_split = spec.unlabeled_split
        self.data_fraction = spec.data_fraction
        self.show_progress = show_progress
        self.logs: dict[str, list] = defaultdict(list)
        self.data_used: dict[str, dict] = {}
        self.loops: dict[str, dict] = {}  # progress-bar loops: {desc: {"steps", "seconds"}} (steps/s in the record)
        self.cached_bases: list[dict] = []  # bases read from the base cache: {"pipeline", "seconds" when it ran}
        self._pretrained: Weights | None = None
        # Storages of the tensors handed to the method (the suite's, cached and shared): a model built from them
        # copies them; any other tensor given to shared_model is a fresh result the model may own (no copy).
        self._inputs: set[int] = set()
        self._owned: set[int] = set()    # storages already owned by a model (a second model copies them)
        self._note_inputs(suite.pretrained.values())

    # ------------------------------------------------------------ weights and models
    @property
    def pretrained_weights(self) -> Weights:
        """theta_0 (floating-point tensors of the encoder), on the context's device: this context's own copy (taken
        once; the suite's tensors stay untouched), shared by every stage of the run, so do not modify it in place."""
        if self._pretrained is None:
            self._pretrained = Weights({k: v for k, v in self._source.pretrained.items()
                                        if v.is_floating_point()}).to(self.device, copy=True)
            self._note_inputs(self._pretrained.values())
        return self._pretrained

    def _expert_tensors(self, task: str) -> Weights:
        """theta_t as the suite stores it (its own tensors, wherever they are, no copy): what ``expert_weights``
        copies and ``per_tensor`` streams. A context that changes the experts (DARE's, the sequential protocol's)
        overrides this."""
        if task not in self.tasks:
            raise KeyError(f"task {task!r} is not one of this context's tasks {self.tasks}")
        w = self._source.expert_weights(task)
        return Weights({k: w[k] for k in self.pretrained_weights})

    def expert_weights(self, task: str) -> Weights:
        """theta_t, the expert fine-tuned on ``task``, on the context's device: a fresh copy at every call (the
        suite's tensors stay untouched, so the caller may change it)."""
        return self._expert_tensors(task).to(self.device, copy=True)

    def task_vector(self, task: str) -> Weights:
        """tau_t = theta_t - theta_0 (new tensors)."""
        return self.expert_weights(task) - self.pretrained_weights

    def task_vectors(self) -> dict[str, Streamed]:
        """{task: tau_t} in task order, streamed (:class:`~mergebench.api.weights.Streamed`): arithmetic on them, e.g.
        ``ctx.pretrained_weights + 0.3 * sum(ctx.task_vectors().values())``, is evaluated one tensor at a time
        when it is used (``shared_model``, ``evaluate``); read as a mapping, each is computed whole (new tensors,
        safe to edit)."""
        return {t: Streamed(self, lambda env, out, t=t: torch.sub(env.experts[t], env.theta0, out=out),
                            leaf="task_vector", task=t) for t in self.tasks}

    def evaluate(self, expression: Streamed) -> Weights:
        """A streamed expression computed, one tensor at a time (new tensors). On the CPU each tensor goes by
        cache-sized parts (each part's operations, hence its results, are those on the whole tensors)."""
        plan, out = Plan(expression), Weights()
        for key, theta0, envs in self._plan_inputs(plan, list(range(len(self.tasks)))):
            if self.device.type == "cpu":
                result = out[key] = torch.empty_like(theta0, memory_format=torch.contiguous_format)
                flat = result.view(-1)
                map_parts(lambda env: flat[env.part].copy_(plan.at(env)), envs, plan.stacked)
            else:
                result = plan.at(envs[0])
                out[key] = result.clone() if result.untyped_storage().data_ptr() in self._inputs else result
        return out

    def evaluate_total(self, expression: Streamed) -> Tensor:
        """The sum of every entry of a streamed per-model expression (a 0-dim tensor), in one pass."""
        plan, total = Plan(expression), 0.0
        for _, _, envs in self._plan_inputs(plan, list(range(len(self.tasks)))):
            for part_total in map_parts(lambda env: plan.at(env).sum(dtype=torch.float64).item(), envs,
                                        plan.stacked):
                total += part_total
        return torch.tensor(total, dtype=next(iter(self.pretrained_weights.values())).dtype, device=self.device)

    def evaluate_row_kth(self, expression: Streamed, rank: int) -> Tensor:
        """Each row's rank-th smallest value over the whole model of a stacked expression ([T]), one row at a time:
        the row's values of every tensor gathered into one buffer (the only extra memory) and partitioned."""
        theta0 = self.pretrained_weights
        flat = torch.empty(theta0.numel(), device=self.device, dtype=next(iter(theta0.values())).dtype)
        out = []
        for row in range(len(self.tasks)):
            plan = Plan(expression, [row])
            if not all(n._rowwise for n in plan.order):
                raise ValueError("a streamed k-th value needs an expression computed row by row (no sum over tasks)")
            start = 0
            for _, v, envs in self._plan_inputs(plan, [row]):
                into = flat[start:start + v.numel()]
                map_parts(lambda env: into[env.part].copy_(plan.at(env).reshape(-1)), envs, plan.stacked)
                start += v.numel()
            out.append(kth_smallest_(flat, rank))
        return torch.stack(out)

    def _plan_inputs(self, plan: Plan, rows: list[int]) -> Iterator[tuple[str, Tensor, list[_Env]]]:
        """``(key, theta_0[key], environments)`` for every key: the experts ``plan`` reads at that key, whole (off
        the CPU), or in parts of ``CACHE_PART`` elements that stay in the cache while every operation of the plan
        runs on them (the expression's operations are elementwise or sums over the tasks, so the parts' results
        are the whole tensor's)."""
        tasks = plan.tasks_read()
        for key, theta0, experts in self.per_tensor(tasks=tasks):
            experts = dict(zip(tasks, experts))
            if self.device.type != "cpu":
                yield key, theta0, [_Env(key, theta0, experts, rows)]
                continue
            flat0 = theta0.reshape(-1)
            flats = {t: e.reshape(-1) for t, e in experts.items()}
            yield key, theta0, [_Env(key, flat0[part], {t: e[part] for t, e in flats.items()}, rows, part)
                                for part in part_slices(theta0.numel())]

    def per_tensor(self, keys: Iterable[str] | None = None,
                   tasks: Sequence[str] | None = None) -> Iterator[tuple[str, Tensor, list[Tensor]]]:
        """``(key, theta_0[key], [theta_t[key] for each task])``, one tensor at a time, on the context's device
        (``tasks``: those experts only, default all; ``keys``: those tensors, default all, in theta_0's order).

        The streaming form of ``expert_weights``: a merge that works tensor by tensor holds one tensor across the
        experts at a time (plus its result), so its memory stays near the experts' own. The expert tensors are
        the suite's own (on the CPU not even copied: that is the point), so they are read-only: compute new
        tensors from them, never modify them in place (the harness checks the inputs after every method).
        """
        theta0 = self.pretrained_weights
        experts = [self._expert_tensors(t) for t in (self.tasks if tasks is None else tasks)]
        for e in experts:
            self._note_inputs(e.values())
        for key in (theta0 if keys is None else keys):
            yield key, theta0[key], [e[key].to(self.device, non_blocking=True) for e in experts]

    def task_vector_stacks(self, keys: Iterable[str] | None = None) -> Iterator[tuple[str, Tensor]]:
        """``(key, [tau_t[key] for each task] stacked: [T, *shape])``, one tensor at a time (a new tensor)."""
        for key, theta0, experts in self.per_tensor(keys):
            yield key, torch.stack(experts).sub_(theta0)

    def _note_inputs(self, tensors: Iterable[Tensor]):
        self._inputs.update(t.untyped_storage().data_ptr() for t in tensors)

    def _may_own(self, tensor: Tensor) -> bool:
        """Whether a model may keep ``tensor`` without copying it: not an input, not already another model's."""
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in self._inputs or ptr in self._owned:
            return False
        self._owned.add(ptr)
        return True

    @property
    def suite(self):
        raise AttributeError(
            "a method has no route to the suite: use the context's accessors (ctx.tasks, ctx.pretrained_weights, "
            "ctx.expert_weights(t), ctx.head(t), ctx.class_embeddings(t), ctx.suite_name, ctx.suite_info and the "
            "data accessors of what it declared in register_method(needs=...))")

    @property
    def suite_name(self) -> str:
        return self._source.name

    @property
    def suite_info(self) -> dict:
        """The suite's identity (ids and hashes that go into every record): a copy."""
        return copy.deepcopy(self._source.info)

    def class_embeddings(self, task: str) -> Tensor:
        """The class embeddings of ``task``'s head ((classes, embed_dim), as the suite stores them): a copy."""
        if task not in self.tasks:
            raise KeyError(f"task {task!r} is not one of this context's tasks {self.tasks}")
        return self._source.heads[task].clone()

    def model_from_tensors(self, tensors: dict, fields: dict) -> MergedModel:
        """A model of one shared encoder written by :func:`mergebench.engine.transfer.tensors_of` (the base cache's)."""
        return transfer.from_tensors(tensors, fields, self._source.encoder_config, self._source.pretrained,
                                     self.device)

    @property
    def embed_dim(self) -> int:
        """The width of the encoder's output embedding (what the heads read)."""
        return int(self._source.encoder_config["output_dim"])

    @property
    def has_lora_experts(self) -> bool:
        """Whether the experts are LoRA adapters with factors (``lora_factors``): mini8-lora, micro-lora, PEFT."""
        return self._source.has_lora

    def lora_factors(self, task: str) -> dict:
        """{adapter: LoraFactor(target, A, B, scale, rows)} of ``task``'s LoRA expert, on the context's device.

        ``expert_weights(task)`` equals the pretrained weights plus each factor's ``scale * B @ A``.
        Raises ``NoLoraExpertsError`` on a suite of full fine-tuned experts.
        """
        return {name: f.to(self.device, copy=True) for name, f in self._source.lora_factors(task).items()}

    def encoder(self, weights: Weights | None = None, own: bool = False,
                device: str | torch.device | None = None) -> torch.nn.Module:
        """A fresh encoder (an ordinary nn.Module) holding copies of ``weights`` (pretrained by default) on the
        context's device (or ``device``). ``own=True``: it keeps the tensors of ``weights`` that are fresh results
        instead of copying them (``shared_model`` does this; do not modify those tensors afterwards)."""
        full = dict(self._source.pretrained)
        if weights is not None:
            full.update(weights)
        return encoder_from_weights(self._source.encoder_config, full, self.device if device is None else device,
                                    self._may_own if own else None).eval()

    def expert_encoder(self, task: str) -> torch.nn.Module:
        return freeze(self.encoder(self.expert_weights(task)))

    def shared_model(self, weights: Weights | Streamed) -> MergedModel:
        """The usual result: one merged encoder for every task. It owns the fresh tensors of ``weights`` (no copy);
        inputs (theta_0, experts) are copied. A streamed expression is computed here, one tensor at a time."""
        if isinstance(weights, Streamed):
            weights = weights._weights if weights._weights is not None else self.evaluate(weights)
        return SharedModel(freeze(self.encoder(weights, own=True)))

    def head(self, task: str) -> torch.nn.Module:
        """The frozen classification head of ``task`` (features -> logits), on the device."""
        return freeze(self._source.head(task).to(self.device))

    def autocast(self):
        """The context of an adaptation loop's forward pass (its backward follows it): bfloat16 autocast on the
        context's device when ``precision`` is "bf16", nothing when it is "fp32". Only the encoder's pass goes
        inside; the merge, the loss and the optimizer stay in float32 (cast the features back with ``.float()``)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    # ------------------------------------------------------------ data (only what was declared)
    def _require(self, kind: str, split: str | None = None):
        allowed = {"unlabeled": {"unlabeled", "labeled"}, "labeled": {"labeled"}}[kind]
        if not (self.needs & allowed):
            raise DataNotDeclaredError(
                f"this method asked for {kind} data but declared needs={sorted(self.needs)}; "
                f"declare needs={kind!r} in register_method to use it")
        if kind == "labeled" and split not in LABELED_SPLITS:
            raise DataNotDeclaredError(
                f"this method asked for the labels of the {split!r} split; labeled methods get the labels of the "
                f"{' and '.join(LABELED_SPLITS)} splits only (test labels are the harness's, for evaluation)")

    def split_size(self, split: str, task: str) -> int:
        """How many images of ``task``'s ``split`` this context serves (``data_fraction`` applied), e.g. to size
        batches as a fraction of a split. Reads no images and counts nothing, so it needs no declaration."""
        return max(1, int(len(self._source.split(split, task)) * self.data_fraction))

    def _indices(self, split: str, task: str, n: int | None) -> Tensor:
        data = self._source.split(split, task)
        g = torch.Generator().manual_seed(self.seed * 7919 + self._source.tasks.index(task))
        order = torch.randperm(len(data), generator=g)
        limit = self.split_size(split, task)
        order = order[:limit] if n is None else order[: min(n, limit)]
        return order

    def _count(self, kind: str, split: str, task: str, images: int):
        entry = self.data_used.setdefault(f"{kind}/{split}", {"kind": kind, "split": split, "images": {}})
        entry["images"][task] = entry["images"].get(task, 0) + images

    def exemplars(self, task: str, n: int, split: str = "train", labels: bool = False):
        """``n`` fixed, shuffled images of ``task`` (normalized, on device), e.g. LOT/RegMean exemplars.

        With ``labels=True`` (needs ``labeled``) returns ``(images, labels)``.
        """
        self._require("labeled" if labels else "unlabeled", split)
        idx = self._indices(split, task, n)
        data = self._source.split(split, task)
        images = self._source.normalize(data.images[idx].to(self.device))
        self._count("labeled" if labels else "unlabeled", split, task, len(idx))
        return (images, data.labels[idx].to(self.device)) if labels else images

    def training_set(self, task: str, split: str = "train") -> tuple[Tensor, Tensor]:
        """Every labeled image of ``task``'s ``split`` as stored (uint8, not normalized, on the CPU) and its labels,
        in a fixed shuffled order: for methods that fine-tune with their own loop (needs ``labeled``)."""
        self._require("labeled", split)
        idx = self._indices(split, task, None)
        data = self._source.split(split, task)
        self._count("labeled", split, task, len(idx))
        return data.images[idx], data.labels[idx]

    def unlabeled(self, task: str, batch_size: int = 16, split: str | None = None,
                  through: Sequence[Callable[[Tensor], Tensor] | None] | None = None) -> Iterator:
        """An endless stream of shuffled unlabeled batches of ``task`` (the test split by default, as the papers do).

        ``through``: frozen functions of the images (a frozen base model, an expert: distillation targets). The
        stream then yields, per batch, the tuple of their outputs on it (``None`` stands for the images
        themselves), in the same order of batches as without. Each function runs once per image of the split,
        in chunks and without gradients, instead of once per batch drawn: a loop that sees every image many
        times does not recompute what cannot change.
        """
        self._require("unlabeled")
        split = split or self.unlabeled_split
        if through is None:
            return self._stream(task, batch_size, split, labels=False)
        return self._stream_through(task, batch_size, split, list(through))

    @torch.no_grad()
    def _stream_through(self, task, batch_size, split, functions):
        data = self._source.split(split, task)
        idx = self._indices(split, task, None)
        tables = []
        for fn in functions:
            if fn is None:
                tables.append(None)
                continue
            chunks = [fn(self._source.normalize(data.images[part].to(self.device))) for part in idx.split(256)]
            tables.append(torch.cat(chunks))
        g = torch.Generator().manual_seed(self.seed * 104729 + self._source.tasks.index(task))
        while True:  # the positions drawn by _stream, as positions into idx
            for batch in torch.randperm(len(idx), generator=g).split(batch_size):
                self._count("unlabeled", split, task, len(batch))
                yield tuple(self._source.normalize(data.images[idx[batch]].to(self.device)) if table is None
                            else table[batch.to(table.device)] for table in tables)

    def labeled(self, task: str, batch_size: int = 32, split: str = "train") -> Iterator[tuple[Tensor, Tensor]]:
        """An endless stream of shuffled ``(images, labels)`` batches of ``task``."""
        self._require("labeled", split)
        return self._stream(task, batch_size, split, labels=True)

    def _stream(self, task, batch_size, split, labels):
        data = self._source.split(split, task)
        idx = self._indices(split, task, None)
        g = torch.Generator().manual_seed(self.seed * 104729 + self._source.tasks.index(task))
        kind = "labeled" if labels else "unlabeled"
        while True:
            for batch in idx[torch.randperm(len(idx), generator=g)].split(batch_size):
                self._count(kind, split, task, len(batch))
                images = self._source.normalize(data.images[batch].to(self.device))
                yield (images, data.labels[batch].to(self.device)) if labels else images

    # ------------------------------------------------------------ reporting
    def progress(self, iterable=None, total=None, desc=None):
        """A progress bar for an optimization loop: ``for step in ctx.progress(range(500), desc=...)``."""
        bar = _progress(total=total if total is not None else (len(iterable) if iterable is not None else None),
                        desc=desc, disable=not self.show_progress)
        if iterable is None:
            return bar

        def gen():
            loop = self.loops.setdefault(desc or "loop", {"steps": 0, "seconds": 0.0})
            with bar:
                start = time.perf_counter()
                try:
                    for item in iterable:
                        yield item
                        bar.update(1)
                        loop["steps"] += 1
                finally:
                    loop["seconds"] += time.perf_counter() - start
        return gen()

    def usage_snapshot(self) -> tuple[dict, dict]:
        """Copies of the data counts and logs so far (with ``usage_since``: what one stage used)."""
        return copy.deepcopy(self.data_used), {k: len(v) for k, v in self.logs.items()}

    def usage_since(self, used: dict, logged: dict) -> tuple[dict, dict]:
        data = {}
        for key, entry in self.data_used.items():
            before = used.get(key, {}).get("images", {})
            images = {t: n - before.get(t, 0) for t, n in entry["images"].items() if n - before.get(t, 0)}
            if images:
                data[key] = {**entry, "images": images}
        return data, {k: v[logged.get(k, 0):] for k, v in self.logs.items() if len(v) > logged.get(k, 0)}

    def add_usage(self, data: dict, logs: dict) -> None:
        """Count data and logs of a stage that did not run here (a base read from the base cache)."""
        for key, entry in data.items():
            mine = self.data_used.setdefault(key, {**entry, "images": {}})
            for task, n in entry["images"].items():
                mine["images"][task] = mine["images"].get(task, 0) + n
        for key, values in logs.items():
            self.logs[key].extend(values)

    def log(self, key: str, value: float):
        """Record a scalar series (e.g. the loss per step); it is stored in the run's record."""
        self.logs[key].append(float(value))
