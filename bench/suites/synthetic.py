"""Shape-exact synthetic suites: what the real benchmark costs, measured without its data or checkpoints.

``synthetic-vitb32`` / ``synthetic-vitb16`` / ``synthetic-vitl14`` build the real image tower (open_clip's
``ViT-B-32-quickgelu`` / ``ViT-B-16-quickgelu`` / ``ViT-L-14-quickgelu`` configs, read from the installed package;
nothing is downloaded) with random weights, and judge it on random data of the real benchmark's shape:

- backbone: open_clip's own initialisation under ``seed``;
- experts: theta_0 + tau_t per task, tau_t[key] ~ N(0, sigma_key^2) elementwise with sigma_key =
  ``expert_scale`` * max(rms(theta_0[key]), 0.01), seeded per task; built when first used;
- data: uint8 images at the model's input size (3 x 224 x 224), one split per dataset card of the eight tasks,
  with the card's split sizes (test: 87,433 images in all) times ``fraction`` (at least one image per split),
  random labels over the card's number of classes; generated when first used, on ``device`` (a CUDA device keeps
  the test tensors resident there: about 13 GB at fraction 1);
- heads: random class vectors, one per class of the card.

The accuracies are meaningless (chance level): a record says ``synthetic`` in its suite info, and the
leaderboard shows such records only as a speed table (merge time, evaluation images/s, peak memory), never an
accuracy. ``synthetic-tiny`` is the same with a narrow 2-layer encoder (width 64) for tests.
"""

from __future__ import annotations

import hashlib
import json

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from mergebench.errors import InputError, NotFoundError
from mergebench.api.models import build_encoder, encoder_weights
from mergebench.suites.base import SPLITS, Suite, TaskData
from mergebench.suites.registry import register_suite
from mergebench.api.weights import Weights
from mergebench.suites.real import cards as cardlib
from mergebench.suites.real.imagecache import LazyTasks
from mergebench.suites.real.zoo import encoder_config as tower_config

# suite name -> open_clip model config (None: the tiny test encoder below)
SYNTHETIC = {"synthetic-vitb32": "ViT-B-32-quickgelu", "synthetic-vitb16": "ViT-B-16-quickgelu",
             "synthetic-vitl14": "ViT-L-14-quickgelu", "synthetic-tiny": None}
TINY_ENCODER = dict(image_size=224, patch_size=32, width=64, layers=2, heads=2, mlp_ratio=4.0, output_dim=32,
                    act="quick_gelu")
VERSION = 1  # bump when what the generators produce changes (it is part of the suite's id)


def encoder_config(name: str, encoder: dict | None = None) -> tuple[dict, str]:
    """(``build_encoder`` config, description) of a synthetic suite's image tower (``encoder``: synthetic-tiny's
    own, for tests that need another size)."""
    model = SYNTHETIC[name]
    if encoder is not None and model is not None:
        raise InputError(f"{name} has the architecture of open_clip's {model}; only synthetic-tiny takes encoder=")
    if model is None:
        return dict(encoder or TINY_ENCODER), "test encoder"


    return tower_config(open_clip.get_model_config(model)), f"open_clip {model}"


def split_sizes(fraction: float = 1.0, cards_dir=None) -> dict[str, dict[str, int]]:
    """{split: {task: images}}: the dataset cards' sizes of the eight tasks times ``fraction`` (at least 1)."""
    cards = cardlib.load_cards(cards_dir)
    chosen = [cardlib.resolve_task(t, cards) for t in cardlib.REAL_TASKS]
    return {s: {c.name: max(1, round(c.sizes[s] * fraction)) for c in chosen} for s in SPLITS}


def load_synthetic(name: str, fraction: float = 1.0, seed: int = 0, device: str | torch.device = "cpu",
                   expert_scale: float = 0.01, cards_dir=None, verbose: bool = True,
                   encoder: dict | None = None) -> Suite:
    """The synthetic suite ``name`` (see the module docstring); ``fraction`` of the real split sizes."""
    if name not in SYNTHETIC:
        raise NotFoundError(f"unknown synthetic suite {name!r} (synthetic suites: {', '.join(SYNTHETIC)})")
    if not 0.0 < float(fraction) <= 1.0:
        raise InputError(f"synthetic suite {name}: fraction must be in (0, 1] (the share of the real test-set "
                         f"sizes, e.g. --fraction 0.01), got {fraction!r}")
    device = torch.device(device)
    cfg, what = encoder_config(name, encoder)
    sizes = split_sizes(fraction, cards_dir)
    tasks = list(sizes["test"])

    cards = cardlib.load_cards(cards_dir)
    classes = {t: cardlib.resolve_task(t, cards).num_classes for t in tasks}

    with torch.random.fork_rng(devices=[]):  # open_clip's initialisation, seeded, without touching the caller's RNG
        torch.manual_seed(seed)
        pretrained = encoder_weights(build_encoder(cfg))
    g = torch.Generator().manual_seed(seed * 7919 + 1)
    heads = {t: torch.randn(classes[t], cfg["output_dim"], generator=g) for t in tasks}

    def load_expert(task: str) -> Weights:
        gen = torch.Generator().manual_seed(seed * 7919 + 101 + tasks.index(task))
        return pretrained.map(lambda k, v: torch.empty_like(v).normal_(0.0, _sigma(v, expert_scale), generator=gen).add_(v))

    def make_split(split: str, task: str) -> TaskData:
        n, s = sizes[split][task], cfg["image_size"]
        gen = torch.Generator(device=device).manual_seed(seed * 7919 + 1009 * (SPLITS.index(split) + 1)
                                                         + tasks.index(task))
        images = torch.randint(0, 256, (n, 3, s, s), dtype=torch.uint8, generator=gen, device=device)
        labels = torch.randint(0, classes[task], (n,), generator=gen, device=device)
        return TaskData(images, labels)


    data = {s: LazyTasks(s, tasks, lambda task, split: make_split(split, task)) for s in SPLITS}
    ident = {"name": name, "encoder": cfg, "seed": seed, "fraction": float(fraction), "expert_scale": expert_scale,
             "sizes": sizes, "version": VERSION}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    if verbose:
        print(f"{name}: {what}, random weights, {sum(sizes['test'].values()):,} random test images "
              f"(fraction {fraction:g}) on {device}")
    return Suite(
        name=name, tasks=tasks, encoder_config=cfg, pretrained=pretrained, heads=heads, data=data,
        load_expert=load_expert, mean=tuple(OPENAI_DATASET_MEAN), std=tuple(OPENAI_DATASET_STD),
        info={"suite": name, "synthetic": True,
              "note": "random weights, experts and images of the real shapes: a speed and memory measurement; "
                      "its accuracies are chance level and are never shown as results",
              "backbone": f"{what} (random weights) " + json.dumps(cfg, sort_keys=True), "fraction": float(fraction),
              "test_images": sizes["test"], "cache_key": key, "checkpoints": {"synthetic": key}})


def _sigma(v: torch.Tensor, scale: float) -> float:
    return scale * max(v.float().pow(2).mean().sqrt().item(), 1e-2)


def _register(name: str) -> None:
    """``name`` as a registered suite, with ``load_synthetic``'s keyword arguments as its options."""
    def loader(build: bool = True, verbose: bool = True, fraction: float = 1.0, seed: int = 0, device: str = "cpu",
               expert_scale: float = 0.01, cards_dir: str | None = None, encoder: dict | None = None) -> Suite:
        return load_synthetic(name, fraction=fraction, seed=seed, device=device, expert_scale=expert_scale,
                              cards_dir=cards_dir, verbose=verbose, encoder=encoder)

    loader.__name__ = loader.__qualname__ = f"load_{name.replace('-', '_')}"
    model = SYNTHETIC[name]
    what = f"open_clip {model}" if model else "a narrow 2-layer encoder (tests)"
    register_suite(name, builds=False, description=f"{what} with random weights, experts and images of the real benchmark's "
                                     f"shapes: speed and memory only",
                   flags={"fraction": "share of the real test-set sizes (default 1: 87,433 test images)"})(loader)


for _name in SYNTHETIC:
    _register(_name)
