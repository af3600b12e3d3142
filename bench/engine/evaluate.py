"""Evaluation: top-1 accuracy of a merged model with each task's frozen head."""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from mergebench.api.models import MergedModel
from mergebench.engine.progress import progress
from mergebench.suites.base import Suite


@torch.no_grad()
def evaluate(model: MergedModel, suite: Suite, split: str = "test", device="cpu", batch_size: int = 512,
             tasks: list[str] | None = None, bf16: bool | None = None, resident: bool = False,
             compile: bool | str = False) -> dict:
    """Per-task top-1 accuracy (%) on ``split``, and images/s of the forward passes (data preparation excluded).

    Images are stored as uint8 and normalized on the device in batches. On CUDA the forward
    runs under bf16 autocast unless ``bf16=False`` (then attention runs through PyTorch's fused
    ``scaled_dot_product_attention``). A task on which the model produces non-finite logits
    gets accuracy NaN (an argmax over NaNs is not a prediction), and is listed under ``nonfinite``.

    ``resident=True`` moves each task's uint8 tensor to the device before the timed passes (images already
    there, as a synthetic suite built on the device keeps them, are used in place). ``compile=True`` (or a
    ``torch.compile`` mode such as ``"reduce-overhead"``: CUDA graphs) runs the model compiled, every batch
    padded to ``batch_size`` so that one graph serves all of them. Counts stay on the device and are read
    once per task.

    ``entropy_auroc``: per task, how well the prediction entropy ranks correct above wrong predictions (the
    area under the ROC curve of -entropy for "correct"; 0.5 = uninformative; NaN when every prediction is
    right or every one wrong). It says whether an entropy objective on test images (AdaMerging and its
    descendants) follows accuracy on this suite.
    """
    device = torch.device(device)
    bf16 = device.type == "cuda" if bf16 is None else bf16
    model = model.to(device).eval()
    forward = torch.compile(model, mode=None if compile is True else compile, dynamic=False) if compile else model
    per_task, images, nonfinite, aurocs = {}, 0, {}, {}
    # Data first (a lazy split is decoded or memory-mapped here, once), so the timer sees forward passes only.
    prepared = {}
    for task in tasks or suite.tasks:
        data = suite.split(split, task)
        stored = data.images.to(device, non_blocking=True) if resident else data.images
        prepared[task] = (stored, data.labels.to(device, non_blocking=True), suite.head(task).to(device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    bar = progress(total=sum(len(labels) for _, labels, _ in prepared.values()), desc=f"evaluate ({split})",
                   unit="img")
    start = time.perf_counter()
    for task, (stored, labels, head) in prepared.items():
        bar.set_postfix_str(task, refresh=False)
        correct = torch.zeros((), dtype=torch.long, device=device)
        bad = torch.zeros((), dtype=torch.long, device=device)
        hits, entropies = [], []
        for i in range(0, len(labels), batch_size):
            x = suite.normalize(stored[i:i + batch_size].to(device, non_blocking=True))
            n = len(x)
            if compile and n < batch_size:  # the same shape as every other batch: no recompilation
                x = F.pad(x, (0, 0, 0, 0, 0, 0, 0, batch_size - n))
            with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
                logits = head(forward(x, task).float())[:n]
            hit = logits.argmax(-1) == labels[i:i + n]
            correct += hit.sum()
            bad += (~torch.isfinite(logits)).any(-1).sum()
            hits.append(hit)
            entropies.append(prediction_entropy(logits))
            bar.update(n)
        correct, bad = int(correct.item()), int(bad.item())   # one synchronisation per task
        per_task[task] = float("nan") if bad else 100.0 * correct / len(labels)
        aurocs[task] = float("nan") if bad else auroc(-torch.cat(entropies).cpu(), torch.cat(hits).cpu())
        if bad:
            nonfinite[task] = bad
        images += len(labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    bar.close()
    return {"accuracy": per_task, "nonfinite": nonfinite, "images": images, "seconds": seconds,
            "images_per_s": images / max(seconds, 1e-9), "entropy_auroc": aurocs}


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per row, the Shannon entropy of softmax(logits) (0 log 0 counted as 0): the evaluation's confidence measure
    and the test-time objective of AdaMerging and its descendants (their batch mean)."""
    return -(logits.softmax(-1) * logits.log_softmax(-1)).nan_to_num().sum(-1)


def mid_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``x``'s values, tied values sharing their average rank (float64)."""
    _, inverse, counts = torch.unique(x.double(), return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    return (ends - (counts.double() - 1) / 2)[inverse]


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` for the boolean labels ``positive`` (Mann-Whitney U with tied
    scores counted half); NaN if one class is empty."""
    positive = positive.bool()
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = mid_ranks(scores)[positive].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
