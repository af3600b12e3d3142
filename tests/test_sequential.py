"""The sequential protocol (issue 8): experts one at a time, evaluation on the tasks seen after each, several
orders; OPCM's projection, Perturb-and-Merge's coefficient, the adapter's TA, the table and plot, failures."""

import json

import pytest
import torch

from mergebench import leaderboard, register_method
from mergebench.methods.continual import opcm_project, pam_coefficient
from mergebench.api.registry import Paper, unregister_method
from mergebench.engine.run import run_one
from mergebench.engine.runspec import RunSpec
from mergebench.engine.sequential import FutureExpertError, SequentialContext, task_orders
from mergebench.api.weights import Weights

PROBE = Paper("A probe", 2026, "0000.00000")


def _run(method, micro, results_dir, **kw):
    return run_one(method, micro, results_dir=results_dir, device="cpu", show_progress=False,
                   **{"protocol": "sequential", "orders": 2, "count_flops": False, **kw})


def test_context_refuses_future_experts_and_data(micro):
    order = [micro.tasks[2], micro.tasks[0], micro.tasks[1]]
    spec = RunSpec.build("perturb_and_merge", micro, device="cpu", orders=[order])   # labeled data, sequentially
    ctx = SequentialContext(micro, spec, order)
    seq = ctx.sequence()
    task, expert = next(seq)
    assert task == order[0] and ctx.tasks == [order[0]]
    assert torch.equal(expert[next(iter(expert))], ctx.expert_weights(order[0])[next(iter(expert))])
    with pytest.raises(FutureExpertError, match="has not arrived"):
        ctx.expert_weights(order[1])
    with pytest.raises(FutureExpertError):
        ctx.task_vector(order[2])
    ctx.exemplars(order[0], 4, labels=True)  # the arriving task's data: allowed
    next(seq)
    with pytest.raises(FutureExpertError, match="arriving task"):
        ctx.exemplars(order[0], 4, labels=True)  # a past task's data: refused
    assert set(ctx.task_vectors()) == set(order[:2])
    with pytest.raises(ValueError, match="permutation"):
        SequentialContext(micro, spec, order[:2])


def test_evaluates_seen_tasks_after_every_step_and_averages_orders(micro, results_dir):
    rec = _run("task_arithmetic", micro, results_dir, orders=3)
    assert rec["status"] == "ok", rec.get("error")
    q = rec["sequential"]
    assert q["adapter"] and len(q["orders"]) == 3 and len(q["per_order"]) == 3
    assert len({tuple(o) for o in q["orders"]}) > 1, "seeded random orders differ"
    assert q["orders"] == task_orders(micro.tasks, 3, seed=0)
    for order, res in zip(q["orders"], q["per_order"]):
        assert res["order"] == order
        for k, step in enumerate(res["steps"]):
            assert step["seen"] == order[:k + 1] and list(step["accuracy"]) == order[:k + 1]
    finals = [o["final_avg_accuracy"] for o in q["per_order"]]
    assert q["final_avg_mean"] == pytest.approx(sum(finals) / 3)
    for t in micro.tasks:
        assert rec["metrics"]["accuracy"][t] == pytest.approx(sum(o["final_accuracy"][t] for o in q["per_order"]) / 3)
    on_disk = json.loads(open(rec["_path"]).read())
    assert on_disk["protocol"] == "sequential" and on_disk["config"]["orders"] == q["orders"]


def test_sequential_task_arithmetic_ends_at_one_shot(micro, results_dir):
    from mergebench.api.context import MergeContext
    from mergebench.methods.baselines import task_arithmetic

    order = [micro.tasks[1], micro.tasks[2], micro.tasks[0]]
    ctx = SequentialContext(micro, RunSpec.build("task_arithmetic", micro, device="cpu", protocol="sequential",
                                                 orders=[order]), order)
    from mergebench.api.pipeline import MethodCall
    from mergebench.engine.sequential import steps
    models = list(steps(MethodCall("task_arithmetic").resolve(), ctx))
    one_shot = task_arithmetic(MergeContext(micro, RunSpec.build("task_arithmetic", micro, device="cpu")), scaling=0.3)
    a, b = models[-1].state_dict(), one_shot.state_dict()
    assert len(models) == 3 and all(torch.allclose(a[k], b[k], atol=1e-6) for k in b)


def test_opcm_projection_is_orthogonal_to_previous_subspace():
    g = torch.Generator().manual_seed(0)
    previous = torch.randn(12, 8, generator=g, dtype=torch.float64)
    new = torch.randn(12, 8, generator=g, dtype=torch.float64)
    alpha = 0.5
    cleaned = opcm_project(previous, new, alpha)
    u, s, vh = torch.linalg.svd(previous, full_matrices=True)
    r = int((s.cumsum(0) / s.sum() > alpha).float().argmax())
    assert r >= 1
    coords = u.T @ cleaned @ vh.T
    assert coords[:r, :r].abs().max() < 1e-10, "no component in the previous dominant subspace"
    assert coords.diagonal().abs().max() < 1e-10, "no component along any u_i v_i^T"
    assert (new - cleaned).norm() > 0 and coords[r:, r:].abs().max() > 1e-3, "the rest is kept"


def test_pam_coefficient_matches_hand_computation():
    # two seen tasks, one 3-vector parameter
    theta1, theta2 = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, 1.0])
    f1, f2 = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([3.0, 1.0, 1.0])
    merged = theta1.clone()  # after step 1
    delta = theta2 - merged
    num = -(((merged - theta1) * f1 * delta).sum() + ((merged - theta2) * f2 * delta).sum())
    den = (f1 * delta ** 2).sum() + (f2 * delta ** 2).sum()
    expected = float(num / den)  # at theta_1 only task 2 pulls: delta^T F_2 delta / delta^T (F_1 + F_2) delta = 5 / 8.5
    got = pam_coefficient(Weights(w=merged), Weights(w=delta), Weights(w=(f1 + f2).double()),
                          Weights(w=(f1 * theta1 + f2 * theta2).double()))
    assert got == pytest.approx(expected) and got == pytest.approx(5 / 8.5)
    # a previous merged model off its experts' optimum changes the coefficient (the cross term counts)
    merged = torch.tensor([0.5, 0.0, 2.0])
    delta = theta2 - merged
    num = -(((merged - theta1) * f1 * delta).sum() + ((merged - theta2) * f2 * delta).sum())
    den = (f1 * delta ** 2).sum() + (f2 * delta ** 2).sum()
    got = pam_coefficient(Weights(w=merged), Weights(w=delta), Weights(w=(f1 + f2).double()),
                          Weights(w=(f1 * theta1 + f2 * theta2).double()))
    assert got == pytest.approx(float((num / den).clamp(0, 1)))


def test_native_methods_run_and_leaderboard_renders_table_and_plot(micro, results_dir):
    opcm = _run("opcm", micro, results_dir, count_flops=True)
    assert opcm["status"] == "ok", opcm.get("error")
    assert opcm["flops"]["mean"] > 0 and opcm["params"]["added"] == 0
    assert opcm["sequential"]["adapter"] is None and len(opcm["sequential"]["per_order"][0]["logs"]["lambda_t"]) == 3
    pam = _run("perturb_and_merge", micro, results_dir)
    assert pam["status"] == "ok", pam.get("error")
    assert "re-fine-tuned" in pam["sequential"]["per_order"][0]["notes"]["perturb_training"]
    assert pam["method"]["needs"] == ["labeled", "sequential"] and pam["data_used"][0]["kind"] == "labeled"
    alphas = pam["sequential"]["per_order"][0]["logs"]["alpha"]
    assert alphas[0] == 1.0 and all(0.0 <= a <= 1.0 for a in alphas)
    # the perturbed experts are cached: the second run trains nothing and gives the same result
    import mergebench.build.train as train_module

    def no_training(*args, **kwargs):
        raise AssertionError("the cached perturbed experts should have been reused")

    original = train_module.train
    train_module.train = no_training
    try:
        again = _run("perturb_and_merge", micro, results_dir, force=True)
    finally:
        train_module.train = original
    assert again["status"] == "ok", again.get("error")
    assert again["sequential"]["final_avg_mean"] == pytest.approx(pam["sequential"]["final_avg_mean"])

    md = leaderboard.render(results_dir, micro.name)
    assert "## Sequential protocol" in md and "OPCM" in md and "Perturb-and-Merge" in md and "±" in md
    csv = leaderboard.render_sequential(results_dir, micro.name, "csv")
    assert csv.splitlines()[0].startswith("Method,Pipeline,Orders,Final Avg")
    assert "\\toprule" in leaderboard.render_sequential(results_dir, micro.name, "latex")
    paths = leaderboard.write(results_dir, micro.name)
    assert paths["sequential_curve_png"].stat().st_size > 1000 and paths["sequential_curve_svg"].exists()
    assert "sequential_curve.svg" in paths["md"].read_text()


def test_failing_sequential_method_is_recorded_and_suite_goes_on(micro, results_dir):
    from mergebench.engine.run import run_many

    @register_method("probe_seq_failing", display_name="Failing probe", needs="sequential", paper=PROBE)
    def probe_seq_failing(ctx):
        """Fails at its second expert."""
        for i, (task, expert) in enumerate(ctx.sequence()):
            if i == 1:
                raise RuntimeError("boom at step 2")
            yield ctx.shared_model(expert)

    @register_method("probe_seq_peeking", display_name="Peeking probe", needs="sequential", paper=PROBE)
    def probe_seq_peeking(ctx):
        """Asks for an expert that has not arrived."""
        for task, expert in ctx.sequence():
            ctx.expert_weights([t for t in ctx._order if t not in ctx.tasks][0])
            yield ctx.shared_model(expert)

    try:
        recs = run_many(["probe_seq_failing", "probe_seq_peeking", "opcm"], micro, results_dir=results_dir,
                        device="cpu", show_progress=False, count_flops=False, orders=1)
        assert [r["status"] for r in recs] == ["failed", "failed", "ok"]
        assert "boom at step 2" in recs[0]["error"] and len(recs[0]["sequential"]["per_order"]) == 0
        assert "FutureExpertError" in recs[1]["error"]
        md = leaderboard.render(results_dir, micro.name)
        assert "probe_seq_failing" in md and "boom at step 2" in md
    finally:
        unregister_method("probe_seq_failing")
        unregister_method("probe_seq_peeking")


def test_bad_protocol_requests_are_clear_errors(micro, results_dir):
    with pytest.raises(ValueError, match="--protocol sequential"):
        run_one("opcm", micro, results_dir=results_dir, protocol="one-shot")
    with pytest.raises(ValueError, match="cannot run under the sequential protocol"):
        run_one("fisher_merging", micro, results_dir=results_dir, protocol="sequential")
    with pytest.raises(ValueError, match="at least 1"):
        task_orders(micro.tasks, 0)


def test_random_task_orders_are_genuinely_different():
    tasks = [f"t{i}" for i in range(8)]
    orders = task_orders(tasks, 3, seed=0)
    assert all(sorted(o) == tasks for o in orders)
    for position in range(8):       # rows of a Latin square: no two orders share a task at any position
        assert len({o[position] for o in orders}) == 3
    pairs = [set(zip(o, o[1:])) for o in orders]
    assert pairs[0] != pairs[1] != pairs[2] != pairs[0]     # not one order shifted
    full = task_orders(tasks, 8, seed=0)
    assert all(sorted(o[p] for o in full) == tasks for p in range(8))    # each task once at each position
    assert task_orders(tasks, 3, seed=1) != orders and task_orders(tasks, 3, seed=0) == orders
    assert len(task_orders(tasks, 11, seed=0)) == 11
