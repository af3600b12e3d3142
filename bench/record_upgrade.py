"""Give records written before a field existed that field, so that leaderboards read records only.

``python -m mergebench.record_upgrade PATH...`` (files, or folders searched for ``*.json``) adds what a record
lacks: ``method.label`` (the display name plus the hyperparameters that differ from the method's defaults, as the
registry has them now), ``method.at_defaults`` (whether its pipeline is the method at every default) and ``budget.below_paper`` (the stages below their paper budgets). A record that has them is
left byte for byte as it is, so running it again changes nothing; a file that is not a readable record is never
written (it is reported).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mergebench.io import atomic_write_text
from mergebench.pipeline import MethodCall
from mergebench.records import COMPANION_FILES, read_record
from mergebench.registry import UnknownMethodError
from mergebench.runspec import at_defaults, method_label


def upgraded(rec: dict) -> dict | None:
    """``rec`` with the fields it lacks, or None when it lacks none."""
    method = rec["method"]
    out = dict(rec)
    if "label" not in method:
        shown = method.get("display_name") or method.get("name") or method["pipeline"]
        label = method_label(method.get("name", ""), shown, method.get("hparams") or {})
        items = list(method.items())
        at = next((i + 1 for i, (k, _) in enumerate(items) if k == "display_name"), len(items))
        out["method"] = dict(items[:at] + [("label", label)] + items[at:])
    if "at_defaults" not in out["method"]:
        items = list(out["method"].items())
        at = next((i + 1 for i, (k, _) in enumerate(items) if k == "label"), len(items))
        out["method"] = dict(items[:at] + [("at_defaults", at_defaults(method["pipeline"]))] + items[at:])
    if not isinstance(rec.get("budget"), dict):
        try:
            below = MethodCall.parse(method["pipeline"]).resolve().below_paper_budget()
        except (UnknownMethodError, ValueError):  # not registered or not parseable: nothing to compare with
            below = []
        items = list(out.items())
        at = next(i + 1 for i, (k, _) in enumerate(items) if k == "method")
        out = dict(items[:at] + [("budget", {"below_paper": below})] + items[at:])
    return out if out != rec else None


def upgrade_file(path: str | Path) -> str:
    """``"upgraded"``, ``"current"`` (nothing to add) or ``"unreadable: WHY"`` (left untouched)."""
    try:
        rec = read_record(path)
    except (OSError, ValueError) as e:
        return f"unreadable: {type(e).__name__}: {e}"
    new = upgraded(rec)
    if new is None:
        return "current"
    atomic_write_text(Path(path), json.dumps(new, indent=1, default=str) + "\n")
    return "upgraded"


def record_files(paths) -> list[Path]:
    out = []
    for p in map(Path, paths):
        found = sorted(p.rglob("*.json")) if p.is_dir() else [p]
        out += [f for f in found if f.name not in COMPANION_FILES]
    return out


def main(argv: list[str]) -> int:
    counts: dict[str, int] = {}
    for path in record_files(argv):
        outcome = upgrade_file(path)
        counts[outcome.split(":")[0]] = counts.get(outcome.split(":")[0], 0) + 1
        if outcome != "current":
            print(f"{path}: {outcome}")
    print(", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no records")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
