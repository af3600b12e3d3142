"""mini8's training routine, shared by pretraining, the experts, the LoRA adapters and methods that re-fine-tune
an expert (Perturb-and-Merge)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mergebench.engine.progress import progress


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 images to the encoder's input range [-1, 1]."""
    return (x.float() / 255.0 - 0.5) / 0.5


def train(encoder, head_weight, x, y, epochs, lr, cfg, desc, verbose, label_smoothing=0.0, weight_decay=None):
    """Cross-entropy with a cosine classifier, AdamW (``cfg.weight_decay`` unless ``weight_decay``) with a warmup +
    cosine schedule, batches of ``cfg.batch_size`` shuffled by ``cfg.seed``; ``head_weight`` trains only if it is a
    Parameter."""
    params = list(encoder.parameters()) + ([head_weight] if isinstance(head_weight, torch.nn.Parameter) else [])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay if weight_decay is None else weight_decay)
    steps = epochs * math.ceil(len(y) / cfg.batch_size)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(cfg.seed)
    encoder.train()
    bar = progress(total=steps, desc=desc, disable=not verbose)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(cfg.batch_size):
            feats = F.normalize(encoder(normalize(x[idx])), dim=-1)
            logits = cfg.logit_scale * feats @ F.normalize(head_weight, dim=-1).t()
            loss = F.cross_entropy(logits, y[idx], label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    encoder.eval()
