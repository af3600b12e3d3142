"""What the adaptation loops reuse instead of recomputing: frozen functions of the unlabeled images (computed once
per image) and base methods' results (the base cache). Each reuse must give what recomputing gives."""

from __future__ import annotations

import torch

from mergebench.engine import basecache
from mergebench.api.context import MergeContext
from mergebench.api.pipeline import MethodCall
from mergebench.engine.run import run_one
from mergebench.engine.execution import execute
from mergebench.engine.runspec import RunSpec


def _ctx(suite, seed=0):
    """The context of an AdaMerging run (unlabeled data) on ``suite``, on the CPU."""
    return MergeContext(suite, RunSpec.build("adamerging_taskwise", suite, seed=seed, device="cpu"), show_progress=False)


def test_stream_through_frozen_functions_equals_calling_them_on_each_batch(micro):
    task = micro.tasks[1]
    plain = _ctx(micro).unlabeled(task, batch_size=7)
    weights = torch.randn(3 * 32 * 32, 5, generator=torch.Generator().manual_seed(0))
    fn = lambda x: x.flatten(1) @ weights  # noqa: E731 - a frozen function of the images
    ctx = _ctx(micro)
    through = ctx.unlabeled(task, batch_size=7, through=(None, fn))
    for _ in range(25):  # several passes over the 64 test images: the reshuffled epochs match too
        images = next(plain)
        same_images, out = next(through)
        assert torch.equal(images, same_images)
        assert torch.allclose(out, fn(images), atol=1e-5)
    assert ctx.data_used["unlabeled/test"]["images"][task] == 64 + 64 + 5 * 7  # epochs of 9 x 7 + 1 images


def test_stream_through_counts_the_batches_drawn(micro):
    task = micro.tasks[0]
    a, b = _ctx(micro), _ctx(micro)
    plain, through = a.unlabeled(task, 16), b.unlabeled(task, 16, through=(lambda x: x.mean((1, 2, 3)),))
    for _ in range(9):
        next(plain), next(through)
    assert a.data_used == b.data_used


def _pipeline_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_cached_base_gives_the_addon_what_a_fresh_base_gives(micro, monkeypatch):
    basecache.clear_memory()
    call = MethodCall.parse("surgery(base=adamerging_layerwise(steps=2), steps=2)").resolve()
    fresh = execute(call, _ctx(micro), reuse_bases=False)
    first_ctx = _ctx(micro)
    first = execute(call, first_ctx)  # fills the cache
    assert first_ctx.cached_bases == []

    ran = []
    original = basecache.store
    monkeypatch.setattr(basecache, "store", lambda *a, **k: (ran.append(a[0]), original(*a, **k)))
    second_ctx = _ctx(micro)
    second = execute(call, second_ctx)
    assert ran == [], "the base ran again instead of coming from the cache"
    assert [b["pipeline"] for b in second_ctx.cached_bases] == [str(call.hparams["base"])]
    for state in (_pipeline_state(first), _pipeline_state(second)):
        assert state.keys() == _pipeline_state(fresh).keys()
        assert all(torch.equal(state[k], v) for k, v in _pipeline_state(fresh).items())
    assert second_ctx.data_used == first_ctx.data_used  # the base's data is counted on a cache hit too
    assert second_ctx.logs.keys() == first_ctx.logs.keys()


def test_the_base_cache_survives_the_process_and_keys_on_the_seed(micro, results_dir):
    basecache.clear_memory()
    spec = "surgery(base=adamerging_taskwise(steps=2), steps=2)"
    first = run_one(spec, micro, results_dir=results_dir, show_progress=False, count_flops=False)
    basecache.clear_memory()  # only the disk copy is left
    again = run_one(spec, micro, results_dir=results_dir, show_progress=False, count_flops=False, force=True)
    assert again["timing"]["cached_bases"] and not first["timing"]["cached_bases"]
    assert again["metrics"]["accuracy"] == first["metrics"]["accuracy"]
    assert again["data_used"] == first["data_used"]
    other_seed = run_one(spec, micro, results_dir=results_dir, show_progress=False, count_flops=False, seed=1)
    assert not other_seed["timing"]["cached_bases"]


def test_records_carry_loop_rates(micro, results_dir):
    rec = run_one("adamerging_taskwise", micro, results_dir=results_dir, show_progress=False, count_flops=False,
                  budget="smoke")
    loop = rec["timing"]["loops"]["AdaMerging (task-wise)"]
    assert loop["steps"] == 2 and loop["steps_per_s"] > 0
    assert rec["budget"] == {"requested": "smoke", "below_paper": ["adamerging_taskwise: steps=2 < 500"]}
