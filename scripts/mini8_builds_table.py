"""The table of tried mini8 builds (docs/mini8.md) from the probe results (``scripts/mini8_probe.py``) in a folder,
default $MERGEBENCH_CACHE/mini8-builds.

    python scripts/mini8_builds_table.py [FOLDER]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mergebench.engine.io import cache_root


def _listed_order(doc: Path = Path(__file__).resolve().parent.parent / "docs" / "mini8.md") -> dict[str, int]:
    """The builds already in docs/mini8.md's table, in its order (a checkout's file times do not keep it); builds
    not listed there yet follow, oldest file first."""
    rows = [line.split("|")[1].strip() for line in (doc.read_text().splitlines() if doc.exists() else [])
            if line.startswith("| ") and not line.startswith("| Build |")]
    return {name: i for i, name in enumerate(rows)}


_listed = _listed_order()


def _value(v) -> str:
    return "{" + ", ".join(f"{k} {x}" for k, x in v.items()) + "}" if isinstance(v, dict) else str(v)


def main():
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else Path(cache_root()) / "mini8-builds")
    print("| Build | Changes from the v1 defaults | Pretrained | Experts | Gap (least task) | TA | WA | TA recovers "
          "| Least TA entropy AUROC | Span (TA, WA, TIES, TSV-M, Iso-CTS) | Build s |")
    print("|:--|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for path in sorted(folder.glob("*.json"), key=lambda p: (_listed.get(p.stem, len(_listed)), p.stat().st_mtime)):
        r = json.loads(path.read_text())
        s = r["summary"]
        changes = ", ".join(f"{k}={_value(v)}" for k, v in r["overrides"].items()) or "none (v1)"
        build = (r.get("build") or {}).get("total_s", "")
        print(f"| {r['name']} | {changes} | {s['pretrained']:.1f} | {s['experts']:.1f} | {s['gap']:.1f} "
              f"({s['min_task_gap']:.1f}) | {s['ta']:.1f} | {s['wa']:.1f} | {100 * s['ta_recovery']:.1f}% "
              f"| {s['ta_min_auroc']:.2f} | {s['span']:.1f} | {build} |")


if __name__ == "__main__":
    main()
