"""``mergebench new-method NAME [--dir D]``: scaffold an installable method plugin package."""

from __future__ import annotations

import sys

HELP = "scaffold an installable method plugin package"


def add_arguments(s) -> None:
    s.add_argument("name", help="the method's registry name, e.g. my_merging")
    s.add_argument("--dir", default=".", help="where to create mergebench-NAME/ (default: here)")
    s.add_argument("--force", action="store_true", help="overwrite an existing folder")


def main(args) -> int:
    from mergebench.api.scaffold import new_method

    try:
        root = new_method(args.name, args.dir, force=args.force)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {root}\nnext: pip install -e {root} && mergebench check-plugin {args.name}")
    return 0
