"""Reinforced Model Merging (Han et al., 2025): a PPO agent assembles the merged encoder block by block.

The environment walks over the transformer blocks. At block i the agent picks that block from one model of
a pool (the T experts and one or more merged models, TIES by default), or skips it (the block is dropped),
or steps back one block. When the walk passes the last block the assembled encoder (stem, i.e. patch
embedding, positional embedding, LayerNorms and projection, from the first merged model) is evaluated on
labeled batches of every task (all of them by default, a fraction with ``data_scale``) and the reward is the
mean accuracy in percent; stepping back before the
first block ends the episode with reward -10. The state is the [blocks x pool] count matrix of the choices.
No gradient ever reaches the merged models: only the agent (a 64-64 tanh actor-critic) is trained.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mergebench.api.models import SharedModel, freeze
from mergebench.api.registry import Paper, get_method, register_method
from mergebench.api.pipeline import MethodCall
from mergebench.engine.execution import execute

RMM = Paper("Reinforced Model Merging", 2025, "2503.21272", None,
            "https://github.com/WuDiHJQ/Reinforced-Model-Merging")

INVALID_REWARD = -10.0   # official: stepping back before the first block

DEFAULTS_SOURCE = (
    "official code (WuDiHJQ/Reinforced-Model-Merging: train_RMM.py, engine/PPO.py, engine/envs/Env_CV.py): "
    "pool = the experts + a TIES merge (--method ties), actions = pick a pool model's block / skip / back, "
    "reward = mean accuracy x 100 (-10 for backing out), PPO with actor lr 3e-4, critic lr 1e-3, gamma 0.99, "
    "clip 0.2, 40 epochs per update, an update every 4 episodes, entropy bonus 1e-4, 700 episodes, Dynamic "
    "Average Reward scale 0.8 over a period of 1/data_scale episodes; -b/--batch_size 128 and --data_scale 1.0 "
    "(argparse defaults of train_RMM.py at commit 7b940fe): engine/utils.py validate_CV evaluates "
    "int(data_scale * len(loader)) batches of each task's reward loader per episode, or the whole loader when "
    "data_scale == 1.0 (then the DAR period is 1 episode: every reward is the raw one). The README's example "
    "passes --data_scale 0.1 'for faster merging'; the defaults here are the argparse ones")

HELP = {
    "episodes": "training episodes of the agent (official 700)",
    "data_scale": "fraction of each task's reward batches (of batch_size validation images) evaluated per "
                  "episode, at least one batch; 1.0 = the whole split (official default; the README's faster "
                  "example uses 0.1); the Dynamic Average Reward period is 1/data_scale episodes",
    "batch_size": "validation images per reward batch (official -b 128)",
    "merged": "the merged models in the pool, '+'-separated data-free methods run with their defaults "
              "(official: ties; its dare_ties option uses three)",
    "update_every": "episodes between PPO updates (official 4)",
    "k_epochs": "PPO epochs per update (official 40)",
    "lr_actor": "Adam learning rate of the actor (official 3e-4)",
    "lr_critic": "Adam learning rate of the critic (official 1e-3)",
    "gamma": "discount factor (official 0.99)",
    "eps_clip": "PPO ratio clip (official 0.2)",
    "dar_scale": "Dynamic Average Reward weight of the previous reward at the last episode (official 0.8)",
}


# ------------------------------------------------------------------ the environment
@dataclass
class Walk:
    """One episode's walk: position, the blocks appended so far as (block, source), and the count state."""

    blocks: int
    pool: int
    position: int = 0
    chosen: list = field(default_factory=list)
    steps: int = 0

    def __post_init__(self):
        self.counts = torch.zeros(self.blocks, self.pool)

    def state(self) -> Tensor:
        return self.counts.reshape(-1).clone()

    def step(self, action: int) -> bool:
        """Apply one action (official Env_CV.step); returns whether the episode is over.

        As in the official environment, 'back' moves the position without removing the block appended
        there, so a walk with backs assembles more blocks than the encoder has (it is evaluated as built).
        """
        if not 0 <= action < self.pool + 2:
            raise ValueError(f"action {action} is outside 0..{self.pool + 1}")
        self.steps += 1
        if action < self.pool:
            self.chosen.append((self.position, action))
            self.counts[self.position, action] += 1.0
            self.position += 1
        elif action == self.pool:      # skip: no block at this position
            self.position += 1
        else:                          # back
            self.position -= 1
        return self.finished or self.backed_out

    @property
    def finished(self) -> bool:
        return self.position == self.blocks

    @property
    def backed_out(self) -> bool:
        return self.position < 0


def plan_actions(plan: list[int | str], pool: int) -> list[int]:
    """Actions for a plan given per block as a pool index, 'skip' or 'back'."""
    names = {"skip": pool, "back": pool + 1}
    return [names[a] if isinstance(a, str) else int(a) for a in plan]


class LayerPool:
    """The pool's encoders (experts, then merged models) and a skeleton whose blocks are swapped in to evaluate
    a walk without copying; the skeleton's stem (all but the blocks) is the first merged model's."""

    def __init__(self, experts: list[nn.Module], merged: list[nn.Module]):
        self.encoders = experts + merged
        self.skeleton = copy.deepcopy(merged[0])
        self.blocks = len(merged[0].transformer.resblocks)

    def assemble(self, chosen: list[tuple[int, int]], copy_blocks: bool = False) -> nn.Module:
        blocks = [self.encoders[src].transformer.resblocks[pos] for pos, src in chosen]
        encoder = self.skeleton
        if copy_blocks:
            encoder = copy.deepcopy(self.skeleton)
            blocks = copy.deepcopy(blocks)
        encoder.transformer.resblocks = nn.ModuleList(blocks)
        return encoder


# ------------------------------------------------------------------ the agent (official engine/PPO.py)
class ActorCritic(nn.Module):
    def __init__(self, state_dim: int, action_dim: int, hidden: int = 64):
        super().__init__()
        self.actor = nn.Sequential(nn.Linear(state_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                   nn.Linear(hidden, action_dim), nn.Softmax(dim=-1))
        self.critic = nn.Sequential(nn.Linear(state_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                    nn.Linear(hidden, 1))

    def evaluate(self, states: Tensor, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        dist = torch.distributions.Categorical(self.actor(states))
        return dist.log_prob(actions), self.critic(states).squeeze(-1), dist.entropy()


class PPOAgent:
    """Clipped PPO with Monte-Carlo returns, as the official agent (buffer cleared after each update)."""

    def __init__(self, state_dim: int, action_dim: int, lr_actor: float, lr_critic: float, gamma: float,
                 k_epochs: int, eps_clip: float, generator: torch.Generator):
        self.gamma, self.k_epochs, self.eps_clip, self.generator = gamma, k_epochs, eps_clip, generator
        self.policy = ActorCritic(state_dim, action_dim)
        self.policy_old = copy.deepcopy(self.policy)
        self.optimizer = torch.optim.Adam([{"params": self.policy.actor.parameters(), "lr": lr_actor},
                                           {"params": self.policy.critic.parameters(), "lr": lr_critic}])
        self.buffer: dict[str, list] = {k: [] for k in ("states", "actions", "logprobs", "values", "rewards", "done")}

    @torch.no_grad()
    def act(self, state: Tensor, greedy: bool = False) -> int:
        probs = self.policy_old.actor(state)
        if greedy:
            return int(probs.argmax())
        action = torch.multinomial(probs, 1, generator=self.generator).squeeze(0)
        self.buffer["states"].append(state)
        self.buffer["actions"].append(action)
        self.buffer["logprobs"].append(torch.log(probs[action]))
        self.buffer["values"].append(self.policy_old.critic(state).squeeze(-1))
        return int(action)

    def record(self, reward: float, done: bool):
        self.buffer["rewards"].append(float(reward))
        self.buffer["done"].append(bool(done))

    def update(self) -> float:
        returns, running = [], 0.0
        for reward, done in zip(reversed(self.buffer["rewards"]), reversed(self.buffer["done"])):
            running = reward + self.gamma * (0.0 if done else running)
            returns.insert(0, running)
        returns = torch.tensor(returns)
        returns = (returns - returns.mean()) / (returns.std() + 1e-7)
        states = torch.stack(self.buffer["states"])
        actions = torch.stack(self.buffer["actions"])
        old_logprobs = torch.stack(self.buffer["logprobs"])
        advantages = returns - torch.stack(self.buffer["values"])
        for _ in range(self.k_epochs):
            logprobs, values, entropy = self.policy.evaluate(states, actions)
            ratios = torch.exp(logprobs - old_logprobs)
            surrogate = torch.min(ratios * advantages, ratios.clamp(1 - self.eps_clip, 1 + self.eps_clip) * advantages)
            loss = (-surrogate + 0.5 * nn.functional.mse_loss(values, returns) - 1e-4 * entropy).mean()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        self.policy_old.load_state_dict(self.policy.state_dict())
        for v in self.buffer.values():
            v.clear()
        return float(loss.detach())


def dynamic_average_reward(reward: float, last: float, episode: int, episodes: int, period: int,
                           scale: float) -> float:
    """Official DAR: at the start of each period the raw reward; otherwise a blend with the previous one whose
    weight grows linearly to ``scale`` over training (smooths the noise of small evaluation subsets)."""
    if (episode - 1) % period == 0:
        return reward
    w = scale * episode / episodes
    return w * last + (1 - w) * reward


# ------------------------------------------------------------------ the method
class LayerPlanModel(SharedModel):
    """The assembled encoder; ``plan`` (plain attribute, not stored) lists its blocks as (block, pool index)."""

    def __init__(self, encoder: nn.Module, plan: list[tuple[int, int]], pool_names: list[str]):
        super().__init__(encoder)
        self.plan = plan
        self.pool_names = pool_names


def merged_pool_members(ctx, merged: str) -> tuple[list[nn.Module], list[str]]:
    names = [n.strip() for n in merged.split("+") if n.strip()]
    if not names:
        raise ValueError("rmm needs at least one merged model in its pool (merged='ties_merging')")
    encoders = []
    for name in names:
        spec = get_method(name)
        if spec.needs != "nothing" or spec.is_addon:
            raise ValueError(f"rmm's pool takes data-free methods that need no base; {name!r} has needs="
                             f"{spec.needs!r}{' and is an add-on' if spec.is_addon else ''}")
        model = execute(MethodCall(name).resolve(), ctx)  # through the harness: the same checks as any run
        if not isinstance(model, SharedModel):
            raise ValueError(f"rmm's pool needs one shared encoder per merged model; {name!r} returned "
                             f"{type(model).__name__}")
        encoders.append(model.encoder)
    return encoders, names


class RewardData:
    """Per task, an endless shuffled stream of labeled validation batches of ``batch_size``; an episode's reward
    is computed on the next ``max(1, int(data_scale * n_batches))`` of them (official ``validate_CV``), or on
    all ``n_batches`` (the whole split) when ``data_scale == 1.0``.

    On the whole split a walk's reward does not depend on the episode (accuracy over a whole split ignores its
    order), so it is computed once per distinct walk and reused: the same rewards as re-evaluating, with fewer
    forward passes.
    """

    def __init__(self, ctx, data_scale: float, batch_size: int):
        self.ctx = ctx
        self.heads = {t: ctx.head(t) for t in ctx.tasks}
        self.whole = data_scale == 1.0
        self.streams, self.batches = {}, {}
        for t in ctx.tasks:
            n_batches = -(-ctx.split_size("val", t) // batch_size)  # a loader's len (the last batch partial)
            self.batches[t] = n_batches if self.whole else max(1, int(data_scale * n_batches))
            self.streams[t] = ctx.labeled(t, batch_size=batch_size, split="val")
        self.cache: dict[tuple, tuple[float, dict[str, float]]] = {}

    @torch.no_grad()
    def reward(self, encoder: nn.Module, walk: tuple | None = None) -> tuple[float, dict[str, float]]:
        """Mean accuracy x 100 of ``encoder`` on every task's batches of this episode (one forward per round
        of batches, all tasks together); ``walk`` (the plan, hashable) keys the whole-split cache."""
        if self.whole and walk is not None and walk in self.cache:
            return self.cache[walk]
        correct = dict.fromkeys(self.ctx.tasks, 0)
        total = dict.fromkeys(self.ctx.tasks, 0)
        for r in range(max(self.batches.values())):
            tasks = [t for t in self.ctx.tasks if r < self.batches[t]]
            batches = [next(self.streams[t]) for t in tasks]
            features = encoder(torch.cat([b[0] for b in batches])).split([len(b[0]) for b in batches])
            for t, f, (_, labels) in zip(tasks, features, batches):
                correct[t] += int((self.heads[t](f).argmax(-1) == labels).sum())
                total[t] += len(labels)
        acc = {t: correct[t] / total[t] for t in self.ctx.tasks}
        result = (100.0 * sum(acc.values()) / len(acc), acc)
        if self.whole and walk is not None:
            self.cache[walk] = result
        return result


@register_method(
    "rmm", display_name="RMM (Reinforced Model Merging)", family="layer-wise search", paper=RMM, needs="labeled",
    defaults_source=DEFAULTS_SOURCE, hyperparameter_help=HELP,
    paper_budget={"episodes": 700, "data_scale": 1.0, "batch_size": 128}, smoke={"episodes": 4},
    ranges={"episodes": "[1, inf)", "data_scale": "(0, 1]", "batch_size": "[1, inf)",
            "update_every": "[1, inf)", "k_epochs": "[1, inf)",
            "lr_actor": "(0, inf)", "lr_critic": "(0, inf)", "gamma": "[0, 1]", "eps_clip": "(0, inf)",
            "dar_scale": "[0, 1]"})
def rmm(ctx, episodes: int = 700, data_scale: float = 1.0, batch_size: int = 128, merged: str = "ties_merging",
        update_every: int = 4, k_epochs: int = 40, lr_actor: float = 3e-4, lr_critic: float = 1e-3,
        gamma: float = 0.99, eps_clip: float = 0.2, dar_scale: float = 0.8):
    """A PPO agent picks, block by block, which pool model's block to use (or skip / back); reward = accuracy.

    Pool: the T experts and the merged model(s) (TIES by default); the stem comes from the first merged
    model. Each episode is one walk over the blocks; a finished walk is evaluated (no gradients) on every
    task's labeled validation split in batches of ``batch_size`` (128): all of them with the default
    ``data_scale=1.0``, else the next ``max(1, int(data_scale * n_batches))`` batches of an endless shuffled
    stream, as the official ``validate_CV``. Reward = mean accuracy x 100, smoothed by the Dynamic Average
    Reward (a blend with the previous episode's reward, reset every 1/data_scale episodes, i.e. never blended
    on the whole split); backing out before the first block gives -10. The agent (actor and critic: 64-64
    tanh MLPs on the flattened [blocks x pool] count state) is updated by clipped PPO every 4 episodes. The
    returned encoder is the greedy (argmax) walk of the trained policy.

    Budget: the official argparse defaults, 700 episodes on the whole reward split (data_scale=1.0) in batches
    of 128; the README's example passes data_scale=0.1 "for faster merging" (mini8's 500 validation images are
    4 batches, so 0.1 gives one batch per task per episode). ``--budget smoke``: 4 episodes. A whole-split
    walk's reward is computed once per distinct walk (see ``RewardData``).

    Deviations: the reward uses the validation split (the official script rewards on the training loader;
    mergebench keeps the experts' training data out of merging). The pool's TIES model
    is mergebench's ``ties_merging`` with its defaults (k=20, scaling 0.3); the official merge_lib's TIES
    (density 0.3, sign election by sum) does not apply its trimming (the trimmed vectors are assigned to a
    loop variable) and takes its weight from the script. The official code
    samples the trained policy at test time; here the greedy walk is taken so that the merge is one
    deterministic encoder, and if that walk backs out (or loops for more than 10 x blocks steps, a guard the
    official environment lacks; such episodes end with -10 like backing out) the best-rewarded walk seen in
    training is used. Plans with 'skip' or 'back' store fewer or more blocks than one encoder; the record
    counts that as (negative or positive) added parameters.
    """
    if episodes < 1 or not 0 < data_scale <= 1 or batch_size < 1 or update_every < 1 or k_epochs < 0:
        raise ValueError(f"rmm needs episodes >= 1, 0 < data_scale <= 1, batch_size >= 1, update_every >= 1 and "
                         f"k_epochs >= 0; got episodes={episodes}, data_scale={data_scale}, batch_size={batch_size}, "
                         f"update_every={update_every}, k_epochs={k_epochs}")
    rewards = RewardData(ctx, data_scale, batch_size)  # first: a context without labeled data fails before any work
    merged_encoders, merged_names = merged_pool_members(ctx, merged)
    experts = [freeze(ctx.expert_encoder(t)) for t in ctx.tasks]
    pool = LayerPool(experts, [freeze(e) for e in merged_encoders])
    pool_names = [f"expert:{t}" for t in ctx.tasks] + [f"merged:{n}" for n in merged_names]
    n_pool, n_blocks = len(pool_names), pool.blocks
    max_steps = 10 * n_blocks

    generator = torch.Generator().manual_seed(ctx.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed)
        agent = PPOAgent(n_blocks * n_pool, n_pool + 2, lr_actor, lr_critic, gamma, k_epochs, eps_clip, generator)
    period = max(1, round(1 / data_scale))
    last_reward, best = 0.0, (float("-inf"), None)
    for episode in ctx.progress(range(1, episodes + 1), desc="RMM"):
        walk = Walk(n_blocks, n_pool)
        done = False
        while not done:
            done = walk.step(agent.act(walk.state())) or walk.steps >= max_steps
            reward = 0.0
            if done:
                if walk.finished:
                    reward, _ = rewards.reward(pool.assemble(walk.chosen), tuple(walk.chosen))
                    if reward > best[0]:
                        best = (reward, list(walk.chosen))
                else:
                    reward = INVALID_REWARD
                ctx.log("rmm/reward", reward)
                reward = dynamic_average_reward(reward, last_reward, episode, episodes, period, dar_scale)
                last_reward = reward
            agent.record(reward, done)
        if episode % update_every == 0:
            ctx.log("rmm/ppo_loss", agent.update())

    walk = Walk(n_blocks, n_pool)
    while not (walk.step(agent.act(walk.state(), greedy=True)) or walk.steps >= max_steps):
        pass
    chosen = walk.chosen if walk.finished else best[1]
    if chosen is None:
        raise RuntimeError(f"rmm: no walk reached the last block in {episodes} episodes; train longer (episodes)")
    ctx.log("rmm/greedy_walk_used", float(walk.finished))
    if rewards.whole:
        ctx.log("rmm/walks_evaluated", float(len(rewards.cache)))
    for pos, src in chosen:
        ctx.log(f"rmm/block{pos}_source", float(src))
    return LayerPlanModel(freeze(pool.assemble(chosen, copy_blocks=True)), list(chosen), pool_names)
