"""Evaluation: top-1 accuracy of a merged model with each task's frozen head."""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from mergebench.models import MergedModel
from mergebench.suites.base import Suite


@torch.no_grad()
def evaluate(model: MergedModel, suite: Suite, split: str = "test", device="cpu", batch_size: int = 512,
             tasks: list[str] | None = None, bf16: bool | None = None) -> dict:
    """Per-task top-1 accuracy (%) on ``split``, and images/s of the forward passes (data preparation excluded).

    Images are stored as uint8 and normalized on the device in batches. On CUDA the forward
    runs under bf16 autocast unless ``bf16=False``. A task on which the model produces
    non-finite logits gets accuracy NaN (an argmax over NaNs is not a prediction), and is
    listed under ``nonfinite``.
    """
    device = torch.device(device)
    bf16 = device.type == "cuda" if bf16 is None else bf16
    model = model.to(device).eval()
    per_task, images, nonfinite = {}, 0, {}
    # Data first (a lazy split is decoded or memory-mapped here, once), so the timer sees forward passes only.
    prepared = {task: (suite.split(split, task), suite.head(task).to(device)) for task in tasks or suite.tasks}
    start = time.perf_counter()
    for task, (data, head) in prepared.items():
        correct, bad = 0, 0
        for i in range(0, len(data), batch_size):
            x = suite.normalize(data.images[i:i + batch_size].to(device, non_blocking=True))
            with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
                logits = head(model(x, task).float())
            correct += (logits.argmax(-1).cpu() == data.labels[i:i + batch_size]).sum().item()
            bad += (~torch.isfinite(logits)).any(-1).sum().item()
        per_task[task] = float("nan") if bad else 100.0 * correct / len(data)
        if bad:
            nonfinite[task] = bad
        images += len(data)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"accuracy": per_task, "nonfinite": nonfinite, "images": images, "seconds": seconds, "images_per_s": images / max(seconds, 1e-9)}
