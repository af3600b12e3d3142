"""Where Task Arithmetic loses on a built mini8 configuration: each task vector alone at several scalings, against
Task Arithmetic (all eight at 0.3), and the cosines between the task vectors.

    python scripts/mini8_scaling_probe.py '{"pretrain_per_task_overrides": {...}}'   # mini8 plus overrides

The configuration must be built (scripts/mini8_probe.py builds it into $MERGEBENCH_CACHE); prints one line per task.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import torch
import torch.nn.functional as F

from mergebench.engine.evaluate import evaluate
from mergebench.api.models import SharedModel
from mergebench.build.mini8 import load_or_build
from mergebench.suites.mini8 import CONFIGS, load_mini8

SCALINGS = (0.0, 0.3, 0.6, 1.0)


def main():
    cfg = dataclasses.replace(CONFIGS["mini8"], **json.loads(sys.argv[1] if len(sys.argv) > 1 else "{}"))
    suite = load_mini8("mini8") if cfg == CONFIGS["mini8"] else load_or_build(cfg, build=False, verbose=False)
    pre = {k: v.float() for k, v in suite.pretrained.items()}
    taus = {t: {k: v.float() - pre[k] for k, v in suite.expert_weights(t).items()} for t in suite.tasks}

    def accuracy(coefs, tasks):
        weights = {k: pre[k] + sum(c * taus[t][k] for t, c in coefs.items() if k in taus[t]) for k in pre}
        return evaluate(SharedModel(suite.build_encoder(weights)), suite, tasks=tasks)["accuracy"]

    ta = accuracy({t: 0.3 for t in suite.tasks}, suite.tasks)
    alone = {t: {s: accuracy({t: s}, [t])[t] for s in SCALINGS} for t in suite.tasks}
    for t in suite.tasks:
        print(f"{t:14s} alone " + " ".join(f"{s}: {a:5.1f}" for s, a in alone[t].items()) + f"   TA 0.3: {ta[t]:5.1f}")
    gap = sum(alone[t][1.0] - alone[t][0.0] for t in suite.tasks)
    print(f"share of the gap at 0.3: alone {sum(alone[t][0.3] - alone[t][0.0] for t in suite.tasks) / gap:.3f}, "
          f"Task Arithmetic {sum(ta[t] - alone[t][0.0] for t in suite.tasks) / gap:.3f}")
    flat = {t: torch.cat([v.flatten() for v in tau.values()]) for t, tau in taus.items()}
    cos = [abs(F.cosine_similarity(flat[a], flat[b], dim=0).item()) for i, a in enumerate(suite.tasks)
           for b in suite.tasks[i + 1:]]
    print(f"task vectors: norms {min(v.norm().item() for v in flat.values()):.2f}-"
          f"{max(v.norm().item() for v in flat.values()):.2f}, largest |cosine| between two {max(cos):.3f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
