"""A method runs in a worker process of its own, holding only what it declared: the trust boundary is a process
boundary.

The harness writes the part of a suite a method may hold into files once per suite and data level
(:func:`method_inputs`): the pretrained encoder, the experts, the heads and LoRA factors always; the images of
every split for a method that declared ``unlabeled`` data; the labels of the training and validation splits as
well for one that declared ``labeled`` data; nothing else. Test labels never leave the harness.

Each merge then runs in a fresh worker process (:func:`run`), forked from the standard library's fork server, a
clean process that imported torch and mergebench but never held a suite. The worker maps those files
copy-on-write (what it writes stays in its own pages), builds a :class:`~mergebench.api.context.MergeContext` over
them, runs the method and sends back the merged model (:mod:`mergebench.engine.transfer`): the tensors of a shared
encoder, or a saved module. The harness evaluates it in its own process on its own suite and fills every cache
(reference accuracies, bases) itself.

Whatever the method does stays in its process: its exit (``SystemExit``, ``os._exit``), a signal, a crash, a hang
past the time limit, memory past the memory limit, global torch state it changed, threads and processes it
started. The harness watches the worker from outside, kills the worker's process group and every process it
started when the method ends (or at a deadline, or when the harness itself is told to stop), and turns what
happened into the method's failed record (:class:`WorkerFailed`).
"""

from __future__ import annotations

import atexit
import copy
import ctypes
import io
import multiprocessing
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import weakref
from dataclasses import dataclass, field
from multiprocessing import forkserver
from pathlib import Path
from typing import Any, Callable

import cloudpickle
import numpy as np
import torch

from mergebench.errors import MergebenchError
from mergebench.api import registry
from mergebench.api.context import MergeContext
from mergebench.api.lora import LoraFactor
from mergebench.api.weights import Weights
from mergebench.engine import integrity, memory, transfer
from mergebench.engine.basecache import CachedBase
from mergebench.engine.execution import execute, loop_rates, seed_everything
from mergebench.engine.limits import MethodTimeout
from mergebench.engine.memory import peak_mb
from mergebench.engine.sequential import run_order
from mergebench.suites.base import Suite, TaskData

# what the fork server imports once, so that a worker starts in milliseconds with torch and the methods loaded
PRELOAD = ["mergebench.engine.worker", "mergebench.engine.run", "mergebench.methods"]
LABELED_SPLITS = ("train", "val")  # mergebench.api.context.LABELED_SPLITS
STARTUP_S = 300.0  # a worker's start (the fork server's first start imports torch) before its time limit runs
_ALIGN = 64


class WorkerFailed(MergebenchError, RuntimeError):
    """The method's worker process ended without a result: it exited, was killed by a signal, ran past its time
    or memory limit, or the method raised (``type_name`` and ``child_traceback`` are the method's error)."""

    def __init__(self, message: str, type_name: str = "WorkerFailed", child_traceback: str = "",
                 extra: dict | None = None):
        super().__init__(message)
        self.type_name, self.child_traceback, self.extra = type_name, child_traceback, extra or {}


# ------------------------------------------------------------------------------------------------ the inputs
def data_level(needs) -> str:
    """What data a method with ``needs`` may hold: "labeled", "unlabeled" (images only) or "nothing"."""
    needs = {needs} if isinstance(needs, str) else set(needs)
    return "labeled" if "labeled" in needs else "unlabeled" if "unlabeled" in needs else "nothing"


@dataclass
class Inputs:
    """Where a worker finds what it may hold (picklable: paths, indexes and plain fields)."""

    folder: str
    level: str
    meta: dict
    packs: dict                     # pack name -> {tensor name: [dtype, shape, offset]}
    files: dict = field(default_factory=dict)  # tensor name -> (.npy path): read-only memory maps of the suite
    fingerprints: dict = field(default_factory=dict)  # integrity.fingerprints of the view, taken by the harness


def _parts(suite, level: str) -> tuple[dict, dict, dict]:
    """The view's tensors by pack ({pack: {name: tensor}}), the memory-mapped images by name and plain fields."""
    weights = {f"p/{k}": v for k, v in suite.pretrained.items()}
    for task in suite.tasks:
        weights.update({f"e/{task}/{k}": v for k, v in suite.expert_weights(task).items()})
        weights[f"h/{task}"] = suite.heads[task]
    lora = {}
    if suite.has_lora:
        for task in suite.tasks:
            lora[task] = {}
            for name, f in suite.lora_factors(task).items():
                weights[f"l/{task}/{name}/A"], weights[f"l/{task}/{name}/B"] = f.A, f.B
                lora[task][name] = {"target": f.target, "scale": f.scale, "rows": f.rows}
    packs, files = {"weights": weights}, {}
    if level != "nothing":
        images, labels = {}, {}
        for split in suite.data:
            for task in suite.tasks:
                data = suite.split(split, task)
                if data.read_only and getattr(data, "file", None):
                    files[f"i/{split}/{task}"] = data.file
                else:
                    images[f"i/{split}/{task}"] = data.images
                if level == "labeled" and split in LABELED_SPLITS:
                    labels[f"y/{split}/{task}"] = data.labels
        packs["images"] = images
        if labels:
            packs["labels"] = labels
    meta = {"name": suite.name, "tasks": list(suite.tasks), "encoder_config": copy.deepcopy(suite.encoder_config),
            "mean": tuple(suite.mean), "std": tuple(suite.std), "logit_scale": suite.logit_scale, "info": copy.deepcopy(suite.info),
            "provides": sorted(suite.provides), "lora": lora, "splits": list(suite.data) if level != "nothing" else []}
    return packs, files, meta


def _assemble(meta: dict, tensors: dict) -> Any:
    """A Suite holding exactly ``tensors`` (named as :func:`_parts` names them)."""
    tasks = meta["tasks"]
    experts = {t: Weights({k[len(f"e/{t}/"):]: v for k, v in tensors.items() if k.startswith(f"e/{t}/")})
               for t in tasks}
    data = {split: {t: TaskData(tensors[f"i/{split}/{t}"], tensors.get(f"y/{split}/{t}"))
                    for t in tasks} for split in meta["splits"]}
    lora = {t: {name: LoraFactor(f["target"], tensors[f"l/{t}/{name}/A"], tensors[f"l/{t}/{name}/B"], f["scale"],
                                 tuple(f["rows"]) if f["rows"] is not None else None)
                for name, f in factors.items()} for t, factors in meta["lora"].items()}
    return Suite(name=meta["name"], tasks=list(tasks), encoder_config=meta["encoder_config"],
                 pretrained=Weights({k[2:]: v for k, v in tensors.items() if k.startswith("p/")}),
                 heads={t: tensors[f"h/{t}"] for t in tasks}, data=data, load_expert=experts.__getitem__,
                 mean=tuple(meta["mean"]), std=tuple(meta["std"]), logit_scale=meta["logit_scale"], info=meta["info"],
                 load_lora=lora.__getitem__ if meta["lora"] else None, provides=frozenset(meta["provides"]))


def _write_pack(path: Path, tensors: dict) -> dict:
    index, offset = {}, 0
    with open(path, "wb") as f:
        for name, t in tensors.items():
            t = t.detach().cpu().contiguous()
            offset = -(-offset // _ALIGN) * _ALIGN
            f.seek(offset)
            raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
            f.write(raw)
            index[name] = [str(t.dtype).removeprefix("torch."), list(t.shape), offset]
            offset += t.numel() * t.element_size()
        f.truncate(max(offset, 1))
    return index


def _read_pack(path: Path, index: dict) -> dict:
    """The pack's tensors over one copy-on-write memory map: reading costs no copy, a write stays in this
    process's own pages (the file and every other process are untouched)."""
    buffer = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c"))
    out = {}
    for name, (dtype, shape, offset) in index.items():
        dtype = getattr(torch, dtype)
        n = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        out[name] = buffer[offset:offset + n].view(dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype)
    return out


_FOLDERS: list[str] = []


def method_inputs(suite, level: str) -> Inputs:
    """The files a worker of ``level`` reads (written once per suite object and level; removed at exit)."""
    cache = suite.__dict__.setdefault("_worker_inputs", {})
    if level in cache and Path(cache[level].folder).is_dir():
        return cache[level]
    folder = Path(tempfile.mkdtemp(prefix=f"mergebench-{suite.name}-{level}-"))
    _FOLDERS.append(str(folder))
    packs, files, meta = _parts(suite, level)
    indexes = {name: _write_pack(folder / f"{name}.pack", tensors) for name, tensors in packs.items()}
    view = {name: t for tensors in packs.values() for name, t in tensors.items()}
    view.update({name: suite.split(*name[2:].split("/", 1)).images for name in files})
    inputs = Inputs(str(folder), level, meta, indexes, files, integrity.fingerprints(_assemble(meta, view)))
    cache[level] = inputs
    weakref.finalize(suite, shutil.rmtree, str(folder), True)
    return inputs


def open_inputs(inputs: Inputs):
    """The worker's suite: the inputs' files mapped, nothing else."""
    tensors = {}
    for name, index in inputs.packs.items():
        tensors.update(_read_pack(Path(inputs.folder) / f"{name}.pack", index))
    for name, path in inputs.files.items():
        tensors[name] = torch.from_numpy(np.load(path, mmap_mode="c"))
    return _assemble(inputs.meta, tensors)


@atexit.register
def _remove_folders():
    if multiprocessing.parent_process() is None:
        for folder in _FOLDERS:
            shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ processes
_LIVE: dict[int, "multiprocessing.process.BaseProcess"] = {}  # pid -> worker: ended at exit and on SIGTERM
_previous_sigterm = None


def _context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def start_server() -> None:
    """Start the fork server now (before forking processes that will start workers: they share it)."""
    _context()
    forkserver.ensure_running()


def use_inherited_server() -> None:
    """In a process forked from one that started the fork server: start workers from that server (this process
    cannot wait for it, not being its parent, so it must not check it as the standard library would)."""
    server = forkserver._forkserver
    if getattr(server, "_forkserver_address", None) is not None:
        server.ensure_running = lambda: None


def _on_sigterm(signum, frame):
    """This process was told to stop: end every worker first (none is left without its parent), then stop as
    it would have."""
    end_all()
    previous = _previous_sigterm
    if callable(previous):
        previous(signum, frame)
    else:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def _watch_sigterm():
    global _previous_sigterm
    if threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(signal.SIGTERM)
    if current is not _on_sigterm:
        _previous_sigterm = current
        signal.signal(signal.SIGTERM, _on_sigterm)


@atexit.register
def end_all():
    for pid in list(_LIVE):
        _end(_LIVE.pop(pid))


def _processes() -> dict[int, tuple[int, int]]:
    """{pid: (parent pid, process group)} of every process (from /proc)."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                out[int(entry)] = (int(fields[1]), int(fields[2]))
            except (OSError, IndexError, ValueError):
                continue
    return out


def _tree(pid: int) -> list[int]:
    """``pid``, every process it started (and they started), and every process in its process group."""
    table = _processes()
    found, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, _) in table.items():
            if ppid == parent and child not in found:
                found.add(child)
                frontier.append(child)
    found.update(p for p, (_, group) in table.items() if group == pid)
    return sorted(found)


def _end(proc) -> None:
    """End the worker and everything it started: stop them all first (no new forks), then kill them."""
    if proc.pid is None:
        return
    for _ in range(3):
        members = [p for p in _tree(proc.pid) if p != os.getpid()]
        if not members:
            break
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for p in members:
                try:
                    os.kill(p, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        if not proc.is_alive():
            break
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.join(5)


def _rss_mb(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker_threads() -> int:
    """The torch threads a worker gets: this process's."""
    return torch.get_num_threads()


@dataclass
class Limits:
    seconds: float | None = None      # wall clock from the worker's start
    memory_mb: float | None = None    # resident memory of the worker and every process it started
    stated_seconds: float | None = None  # the limit as the user gave it (``seconds`` may be what is left of it)


def run(job: dict, what: str, limits: Limits | None = None,
        on_message: Callable[[tuple, Callable[[Any], None]], None] | None = None) -> dict:
    """Run ``job`` (see :func:`_worker_main`) in a fresh worker; returns its result message's fields. The time
    limit runs from the worker's "ready" (its inputs mapped) to its "release" (the method's part done).

    ``on_message(message, reply)`` receives every message that is not the result (a base to cache, a model of a
    sequential step); ``reply`` answers the worker. Raises :class:`WorkerFailed` for everything that ends the
    worker without a result. The worker and everything it started are ended before this returns."""
    limits = limits or Limits()
    _watch_sigterm()
    mp = _context()
    here, there = mp.Pipe(duplex=True)
    payload = cloudpickle.dumps({"job": cloudpickle.dumps(job), "env": dict(os.environ), "cwd": os.getcwd(),
                                 "sys_path": list(sys.path), "threads": worker_threads()})
    proc = mp.Process(target=_worker_main, args=(there, payload), name=f"mergebench: {what}", daemon=False)
    proc.start()
    _LIVE[proc.pid] = proc
    there.close()
    # the time limit runs from the worker's "ready" (the method's first line); its start-up gets a deadline too
    deadline = None if limits.seconds is None else time.monotonic() + limits.seconds + STARTUP_S
    poll = 0.1 if limits.memory_mb else 0.5
    try:
        while True:
            wait = poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic()))
            if here.poll(wait):
                try:
                    message = plain_loads(here.recv_bytes())
                except (EOFError, OSError):
                    raise _ended(proc, what) from None
                kind = message[0]
                if kind == "ready":
                    if limits.seconds is not None:
                        deadline = time.monotonic() + limits.seconds
                    continue
                if kind == "release":  # the limited part is done: its checks and the model's transfer are left
                    deadline = None
                    continue
                if kind == "result":
                    return message[1]
                if kind == "error":
                    _, type_name, text, child_tb, extra = message
                    raise WorkerFailed(text, type_name, child_tb, extra)
                if on_message is not None:
                    on_message(message, here.send)
                continue
            if not proc.is_alive() and not here.poll(0):
                raise _ended(proc, what)
            if deadline is not None and time.monotonic() >= deadline:
                raise WorkerFailed(str(MethodTimeout(f"{what} exceeded its time limit of "
                                                 f"{limits.stated_seconds or limits.seconds:g} s")),
                                   "MethodTimeout")
            if limits.memory_mb is not None:
                used = _rss_mb(_tree(proc.pid))
                if used > limits.memory_mb:
                    raise WorkerFailed(f"{what} exceeded its memory limit of {limits.memory_mb:g} MB "
                                       f"({used:,.0f} MB resident)", "MemoryLimitExceeded")
    finally:
        _LIVE.pop(proc.pid, None)
        _end(proc)
        here.close()


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"{module}.{name}")


def plain_loads(data: bytes):
    """A worker's message, read as plain data only (numbers, strings, lists, tuples, dicts, None): a message that
    names any class or function (a pickle that would run code here) is refused, and the worker with it."""
    try:
        return _PlainUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise WorkerFailed(f"the worker sent a message that is not plain data ({e}); a method's logs and notes "
                           f"are numbers and strings", "WorkerMessageRefused") from None


def _ended(proc, what: str) -> WorkerFailed:
    proc.join(5)
    code = proc.exitcode
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        how = f"was killed by signal {-code} ({name})"
        hint = " (a crash in native code, or the method killed its own process?)"
    else:
        how = f"exited with status {code}"
        hint = " (os._exit, or sys.exit from code that ran outside the method's call?)"
    return WorkerFailed(f"the process running {what} {how} before it returned a model{hint}", "WorkerExited")


# ------------------------------------------------------------------------------------------------ inside the worker
def _global_state() -> dict:
    """Process-wide torch settings a method could change (and leave changed)."""
    state = {"grad enabled": torch.is_grad_enabled(), "default dtype": str(torch.get_default_dtype()),
             "threads": torch.get_num_threads(), "deterministic algorithms": torch.are_deterministic_algorithms_enabled(),
             "anomaly detection": torch.is_anomaly_enabled(),
             "float32 matmul precision": torch.get_float32_matmul_precision(),
             "inference mode": torch.is_inference_mode_enabled()}
    if hasattr(torch, "get_default_device"):
        state["default device"] = str(torch.get_default_device())
    return state


def _left_running(threads_before: set, children_before: set) -> list[str]:
    """Threads and processes the method started and left running."""
    out = [f"thread {t.name!r}" for t in threading.enumerate()
           if t.ident not in threads_before and t.is_alive() and type(t).__name__ != "TMonitor"]
    me = os.getpid()
    out += [f"process {p}" for p in _tree(me) if p != me and p not in children_before]
    return out


def _worker_main(conn, payload: bytes) -> None:
    """The worker: end with its parent, become its own process group, take the harness's settings, then run the
    job and send back its result or error."""
    os.setpgid(0, 0)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the server
    except (OSError, AttributeError):
        pass
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the harness, which ends the worker
    try:
        job = _prepare(payload)
        job["suite"] = open_inputs(job["inputs"])
        conn.send(("ready",))
        result = _JOBS[job["kind"]](job, conn)
        conn.send(("result", result))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the harness, which decides
        extra = getattr(e, "worker_extra", {})
        try:
            conn.send(("error", type(e).__name__, str(e), traceback.format_exc(limit=12), extra))
        except Exception:  # noqa: BLE001 - an error that does not pickle is sent as text
            conn.send(("error", type(e).__name__, str(e), traceback.format_exc(limit=12), {}))
    finally:
        conn.close()
    os._exit(0)  # no atexit handlers, no joining of threads the method left: the harness ends them


def _prepare(payload: bytes) -> dict:
    """Take the harness's environment, folder, import path and threads, then read the job (its methods may live in
    modules that only that path finds) and register its methods as the harness knows them."""
    settings = pickle.loads(payload)
    os.environ.clear()
    os.environ.update(settings["env"])
    os.chdir(settings["cwd"])
    sys.path[:] = settings["sys_path"]
    torch.set_num_threads(settings["threads"])
    job = pickle.loads(settings["job"])  # functions pickled by value load through cloudpickle (imported above)
    registry.METHODS._discovered = True  # the job carries its methods; no entry point is imported here
    for spec in job["specs"]:
        registry.METHODS.unregister(spec.name)
        registry.METHODS.add(spec.name, spec, module=spec.fn.__module__)
    return job


_JOBS: dict[str, Callable] = {}


def job(kind: str):
    """Register the function that runs jobs of ``kind`` in a worker (``fn(job, conn) -> result fields``)."""
    def register(fn):
        _JOBS[kind] = fn
        return fn
    return register


# ------------------------------------------------------------------------------------------------ the jobs
class GlobalStateChangedError(MergebenchError, RuntimeError):
    """A method changed process-wide torch settings and left them changed."""


class _Bases:
    """The base cache as a worker sees it: the harness looked the bases up before the worker started (``hits``)
    and stores what the worker sends back; the worker writes no cache."""

    def __init__(self, hits: dict, folder: Path, conn):
        self.hits, self.folder, self.conn, self.sent = hits, folder, conn, 0

    def lookup(self, call, ctx):
        hit = self.hits.get(str(call))
        if hit is None:
            return None
        model = transfer.load(hit["model"], self.folder, ctx._source.encoder_config, ctx._source.pretrained,
                              ctx.device, set())
        return CachedBase(model, hit["seconds"], copy.deepcopy(hit["data_used"]), copy.deepcopy(hit["logs"]))

    def store(self, call, ctx, entry):
        self.sent += 1
        note = transfer.save(entry.model, self.folder, f"base-{self.sent}")
        self.conn.send(("base", str(call), note, entry.seconds, entry.data_used, entry.logs))


def _watched(job: dict, work: Callable[[], dict]) -> dict:
    """Run ``work`` (the method's part) and check what it left: its inputs, global torch state, threads and
    processes. Anything that fails names what the method changed in its inputs as well."""
    suite = job["suite"]
    state = _global_state()
    threads, children = {t.ident for t in threading.enumerate()}, set(_tree(os.getpid()))

    def inputs_modified() -> list[str]:
        now = integrity.fingerprints(suite)
        return [label for label, digest in job["inputs"].fingerprints.items() if now.get(label, digest) != digest]

    try:
        out = work()
    except BaseException as e:
        changed = inputs_modified()
        if changed:
            e.worker_extra = {"inputs_modified": changed}
        raise
    changed = inputs_modified()
    if changed:
        raise integrity.InputsModifiedError(job["name"], changed)
    after = _global_state()
    diff = [f"{k} {state[k]} -> {after[k]}" for k in state if after.get(k) != state[k]]
    if diff:
        raise GlobalStateChangedError(
            f"{job['name']} changed global torch state and left it changed ({'; '.join(diff)}); restore what it "
            f"changes (e.g. `with torch.no_grad():` instead of torch.set_grad_enabled(False), a dtype argument "
            f"instead of torch.set_default_dtype)")
    out["left_running"] = _left_running(threads, children)
    return out


@job("merge")
def _merge_job(job: dict, conn) -> dict:
    """One merge (a pipeline: its bases first): the model and what the merge used and cost."""
    suite, spec = job["suite"], job["spec"]
    device = torch.device(spec.device)
    folder = Path(job["folder"])

    def work() -> dict:
        memory.reset_peak(device)
        seed_everything(spec.seed)
        ctx = MergeContext(suite, spec, job["show_progress"])
        stages: dict = {}
        start = time.perf_counter()
        model = execute(spec.call, ctx, stages, reuse_bases=job["reuse_bases"],
                        bases=_Bases(job["bases"], folder, conn))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        conn.send(("release",))
        merge_s = time.perf_counter() - start + sum(b["seconds"] for b in ctx.cached_bases)
        theta_0 = {} if ctx._pretrained is None else ctx._pretrained  # what every stage of a pipeline reads
        modified = [f"pretrained {k!r} (ctx.pretrained_weights)" for k, v in theta_0.items()
                    if integrity.fingerprint(v) != integrity.fingerprint(suite.pretrained[k])]
        return {"model": model, "merge_s": merge_s, "pretrained_modified": modified, "stages_s": stages, "memory": peak_mb(device),
                "data_used": list(ctx.data_used.values()), "logs": dict(ctx.logs), "loops": _loops(ctx),
                "cached_bases": ctx.cached_bases, "threads": torch.get_num_threads()}

    out = _watched(job, work)
    out["model"] = transfer.save(out["model"], folder, "model")
    return out


def _loops(ctx) -> dict:
    return loop_rates(ctx)


@job("sequential")
def _sequential_job(job: dict, conn) -> dict:
    """Every task order of a sequential run: after each arrival the model goes to the harness, which evaluates it
    and answers with its accuracy on the tasks seen so far."""
    suite, spec = job["suite"], job["spec"]
    device = torch.device(spec.device)
    folder = Path(job["folder"])

    def work() -> dict:
        memory.reset_peak(device)
        orders = []
        for i, order in enumerate(spec.orders):
            steps = [0]

            def evaluate_fn(model, tasks, i=i, steps=steps):
                steps[0] += 1
                conn.send(("step", i, transfer.save(model, folder, f"order{i}-step{steps[0]}"), list(tasks)))
                answer = conn.recv()
                return answer[1]

            seed_everything(spec.seed)
            result, _, ctx = run_order(spec, suite, order, job["show_progress"], evaluate_fn, lambda m: None)
            orders.append({"merge_s": result["merge_s"], "logs": result["logs"], "notes": result["notes"],
                           "data_used": ctx.data_used})
        conn.send(("release",))
        return {"orders": orders, "memory": peak_mb(device), "threads": torch.get_num_threads()}

    return _watched(job, work)
