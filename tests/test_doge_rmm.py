"""DOGE TA (data-free projective gradient descent) and Reinforced Model Merging (PPO layer search), micro suite."""

from __future__ import annotations

import pytest
import torch

from mergebench.api.context import DataNotDeclaredError, MergeContext
from mergebench.api.activations import is_block_linear_weight
from mergebench.methods.doge import (
    doge, doge_loss, optimize_delta, project_off, shared_subspace_projector,
)
from mergebench.methods.rmm import (
    LayerPool, PPOAgent, Walk, dynamic_average_reward, plan_actions, rmm,
)
from mergebench.methods.ties import ties_merging
from mergebench.api.registry import get_method
from mergebench.engine.run import run_one
from mergebench.engine.execution import seed_everything
from mergebench.engine.runspec import RunSpec

FAST_RMM = "rmm(episodes=8, data_scale=0.25, batch_size=8)"


def _ctx(suite, method="doge", seed=0):
    """The context of a run of ``method`` (so the data it declared) on ``suite``, on the CPU."""
    seed_everything(seed)
    return MergeContext(suite, RunSpec.build(method, suite, seed=seed, device="cpu"), show_progress=False)


def _state(model):
    return {k: v.detach().clone() for k, v in model.encoder.state_dict().items()}


# ------------------------------------------------------------------ both, end to end
@pytest.mark.parametrize("method", ["doge", FAST_RMM])
def test_runs_end_to_end(micro, results_dir, method):
    record = run_one(method, micro, results_dir=results_dir, device="cpu", show_progress=False,
                     count_flops=False)
    assert record["status"] == "ok", record.get("error")
    assert all(0 <= a <= 100 for a in record["metrics"]["accuracy"].values())
    spec = get_method(record["method"]["name"])
    if method == "doge":
        assert spec.needs == "nothing" and record["params"]["added"] == 0 and not record["data_used"]
    else:
        assert spec.needs == "labeled" and {(u["kind"], u["split"]) for u in record["data_used"]} == {("labeled", "val")}


# ------------------------------------------------------------------ DOGE
def test_doge_without_steps_is_task_arithmetic_with_adaptive_coefficients(micro):
    """steps=0 (delta = 0) and K=100 (no mask): theta_0 + sum_t 0.07/||tau_t^l|| tau_t^l on each block linear
    matrix (q, k, v separately), theta_0 elsewhere."""
    ctx = _ctx(micro)
    got = _state(doge(ctx, steps=0, k=100.0))
    theta0, tvs = ctx.pretrained_weights, list(ctx.task_vectors().values())
    checked = 0
    for key, value in theta0.items():
        if is_block_linear_weight(key):
            n = 3 if key.endswith("in_proj_weight") else 1
            chunks = [sum(0.07 / tv[key].chunk(n)[i].norm() * tv[key].chunk(n)[i] for tv in tvs) for i in range(n)]
            expected = value + torch.cat(chunks)
            checked += 1
        else:
            expected = value
        assert torch.allclose(got[key], expected, atol=1e-6), key
    assert checked == 4 * len(ctx.encoder().transformer.resblocks)


def test_doge_loss_is_the_official_per_task_loop():
    torch.manual_seed(0)
    tm, delta, lam = torch.randn(3, 5, 4), torch.randn(5, 4), torch.rand(3)
    total = 0.0
    merged_tv = (tm * lam.view(-1, 1, 1)).sum(0)
    merged_delta = (delta.unsqueeze(0) * lam.view(-1, 1, 1)).sum(0)
    for v in tm:                                     # the official taskvector_loss, term by term
        total = total + (-v * merged_tv - v * merged_delta + v * v).sum(1).pow(2).sum()
    assert torch.allclose(doge_loss(tm, delta, lam), total)


def test_shared_subspace_projector_and_projected_gradient():
    torch.manual_seed(0)
    m, n, tasks = 24, 12, 3
    shared = torch.nn.functional.normalize(torch.randn(m), dim=0)
    tm = torch.stack([10 * torch.outer(shared, torch.randn(n)) + 0.01 * torch.randn(m, n) for _ in range(tasks)])
    p = shared_subspace_projector(tm, subspace=6.0)
    assert torch.allclose(p, p.T, atol=1e-5) and torch.allclose(p @ p, p, atol=1e-5)
    assert round(torch.trace(p).item()) == int(min(m, n) / 6)
    assert (p @ shared).norm() > 0.999                            # the direction all tasks share is in it
    grad = torch.randn(m, n)
    projected = project_off(grad, p)
    assert torch.allclose(p @ projected, torch.zeros(m, n), atol=1e-5)   # nothing left in the shared subspace
    assert torch.allclose(project_off(projected, p), projected, atol=1e-5)
    assert (projected - grad).norm() > 1e-3                        # and it did remove something


def test_doge_loss_decreases_on_micro_task_vectors(micro):
    ctx = _ctx(micro)
    tvs = list(ctx.task_vectors().values())
    key = next(k for k in tvs[0] if k.endswith("mlp.c_fc.weight"))
    tm = torch.stack([tv[key] for tv in tvs])
    lam = 0.07 / tm.flatten(1).norm(dim=1)
    delta, losses = optimize_delta(tm, lam, shared_subspace_projector(tm, 6.0), steps=50, lr=1e-4)
    assert losses[-1] < 0.5 * losses[0]
    assert torch.isfinite(delta).all() and delta.abs().sum() > 0


# ------------------------------------------------------------------ RMM
def test_walk_follows_the_official_environment():
    walk = Walk(blocks=3, pool=4)
    assert not walk.step(2) and not walk.step(4)            # block 0 from model 2, skip block 1
    assert walk.step(1) and walk.finished
    assert walk.chosen == [(0, 2), (2, 1)]
    assert walk.state().reshape(3, 4)[0, 2] == 1 and walk.state().sum() == 2
    back = Walk(blocks=2, pool=3)
    assert not back.step(0) and not back.step(4)            # 'back' keeps the block already appended
    assert not back.step(1) and back.step(2)
    assert back.chosen == [(0, 0), (0, 1), (1, 2)]
    out = Walk(blocks=2, pool=3)
    assert out.step(4) and out.backed_out and not out.finished
    with pytest.raises(ValueError):
        Walk(blocks=2, pool=3).step(5)
    assert plan_actions([0, "skip", "back"], pool=3) == [0, 3, 4]


def test_assembled_model_is_what_the_plan_describes(micro):
    ctx = _ctx(micro)
    experts = [ctx.expert_encoder(t) for t in ctx.tasks]
    ties = ties_merging(ctx).encoder
    pool = LayerPool(experts, [ties])
    blocks = pool.blocks
    images = torch.randn(5, 3, 32, 32)[..., : experts[0].conv1.kernel_size[0] * experts[0].grid_size[0],
                                          : experts[0].conv1.kernel_size[0] * experts[0].grid_size[0]]
    merged_index = len(experts)
    all_merged = pool.assemble([(i, merged_index) for i in range(blocks)], copy_blocks=True)
    with torch.no_grad():
        assert torch.equal(all_merged(images), ties(images))
    for t, expert in enumerate(experts):               # every block from expert t, stem from the merged model
        assembled = pool.assemble([(i, t) for i in range(blocks)], copy_blocks=True)
        for key, value in assembled.state_dict().items():
            source = expert if ".resblocks." in key else ties
            assert torch.equal(value, source.state_dict()[key]), key
    skipped = pool.assemble([(0, 1)], copy_blocks=True)
    assert len(skipped.transformer.resblocks) == 1
    with torch.no_grad():
        assert torch.isfinite(skipped(images)).all()


def test_rmm_plan_reward_data_and_determinism(micro):
    ctx = _ctx(micro, "rmm")
    model = rmm(ctx, episodes=8, data_scale=0.25, batch_size=8)  # one batch of 8 per task per episode
    n_pool = len(micro.tasks) + 1
    assert model.plan and all(0 <= pos < len(ctx.encoder().transformer.resblocks) and 0 <= src < n_pool
                              for pos, src in model.plan)
    assert len(model.encoder.transformer.resblocks) == len(model.plan)
    assert set(ctx.data_used) == {"labeled/val"}                      # rewards only from the validation split
    assert set(ctx.data_used["labeled/val"]["images"]) == set(micro.tasks)
    assert all(r == -10.0 or 0 <= r <= 100 for r in ctx.logs["rmm/reward"]) and len(ctx.logs["rmm/reward"]) == 8
    assert len(ctx.logs["rmm/ppo_loss"]) == 2                           # an update every 4 episodes
    again = rmm(_ctx(micro, "rmm"), episodes=8, data_scale=0.25, batch_size=8)
    assert again.plan == model.plan
    a, b = _state(model), _state(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(DataNotDeclaredError):
        rmm(_ctx(micro, "adamerging_taskwise"), episodes=1)   # declared unlabeled data only
    with pytest.raises(ValueError, match="data-free"):
        rmm(_ctx(micro, "rmm"), episodes=1, merged="adamerging_taskwise")


def test_dynamic_average_reward():
    assert dynamic_average_reward(50.0, 10.0, episode=1, episodes=100, period=10, scale=0.8) == 50.0
    assert dynamic_average_reward(50.0, 10.0, episode=11, episodes=100, period=10, scale=0.8) == 50.0
    w = 0.8 * 50 / 100
    assert dynamic_average_reward(50.0, 10.0, episode=50, episodes=100, period=10, scale=0.8) == pytest.approx(
        w * 10 + (1 - w) * 50)


def test_ppo_agent_learns_a_rewarded_action():
    """A one-step bandit: action 1 pays 1, the others 0; PPO must raise its probability well above 1/3."""
    torch.manual_seed(0)
    agent = PPOAgent(2, 3, 3e-4, 1e-3, 0.99, 40, 0.2, torch.Generator().manual_seed(0))
    state = torch.zeros(2)
    before = agent.policy_old.actor(state)[1].item()
    for episode in range(1, 161):
        agent.record(float(agent.act(state) == 1), True)
        if episode % 4 == 0:
            agent.update()
    after = agent.policy_old.actor(state)[1].item()
    assert after > before + 0.2, (before, after)


@pytest.mark.parametrize("data_scale, batch_size, batches", [(1.0, 8, 4), (0.5, 8, 2), (0.1, 8, 1), (0.25, 128, 1)])
def test_rmm_reward_data_is_a_fraction_of_the_batches(micro, data_scale, batch_size, batches):
    """Official validate_CV: int(data_scale * len(loader)) batches per episode (at least one here), the whole
    loader at data_scale 1.0, where a walk's reward is computed once (micro: 32 validation images per task)."""
    ctx = _ctx(micro, "rmm")
    rmm(ctx, episodes=8, data_scale=data_scale, batch_size=batch_size)
    finished = sum(r >= 0 for r in ctx.logs["rmm/reward"])
    used = ctx.data_used["labeled/val"]["images"]
    per_episode = min(32, batches * batch_size)
    if data_scale == 1.0:
        walks = int(ctx.logs["rmm/walks_evaluated"][0])
        assert 1 <= walks <= finished and all(n == per_episode * walks for n in used.values())
    else:
        assert "rmm/walks_evaluated" not in ctx.logs
        assert all(n == per_episode * finished for n in used.values())


def test_rmm_defaults_are_the_official_budget():
    spec = get_method("rmm")
    assert {k: spec.hyperparameters[k].default for k in ("episodes", "data_scale", "batch_size")} == {
        "episodes": 700, "data_scale": 1.0, "batch_size": 128}
