"""``mergebench zoo init DIR | --hf-cache DIR [--out M.yaml]`` and ``mergebench zoo hash PATH``: model-zoo
manifests (:mod:`mergebench.suites.real.zoo_init`)."""

from __future__ import annotations

import sys

HELP = "model-zoo manifests: write one from your files (init), or hash a file (hash)"
DESCRIPTION = ("zoo init DIR: scan a folder of checkpoints (task names from file names, formats from content, sha256 "
               "of every file) and write DIR/manifest.yaml. zoo init --hf-cache DIR: the same from a Hugging Face "
               "cache (openai/clip-vit-* backbones, <org>/clip-vit-*_<task> experts). zoo hash PATH: the sha256 a "
               "manifest expects. Fields: docs/manifest.md.")


def add_arguments(s) -> None:
    s.add_argument("action", choices=["init", "hash"])
    s.add_argument("path", nargs="*", help="init: the folder to scan; hash: files or folders")
    s.add_argument("--hf-cache", metavar="DIR", help="init: a Hugging Face cache folder (hub, or the folder holding it)")
    s.add_argument("--out", "-o", help="init: the manifest to write (default DIR/manifest.yaml; --hf-cache: "
                                       "./<model>.yaml)")
    s.add_argument("--model", help="init: the open_clip model config name (default: matched by tensor shapes)")
    s.add_argument("--model-config", metavar="FILE.json", help="init: open_clip.CLIP arguments for an architecture "
                                                               "open_clip has no name for")
    s.add_argument("--backbone", metavar="FILE", help="init: the full CLIP checkpoint (default: found in the folder)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--quick-gelu", action="store_true", help="init: the backbone uses QuickGELU (OpenAI's weights)")
    g.add_argument("--gelu", action="store_true", help="init: the backbone uses GELU (LAION, DataComp weights)")
    s.add_argument("--data-root", help="init: write this data root into the manifest")
    s.add_argument("--name", help="init: the suite name (real-NAME; default: the model)")
    s.add_argument("--trust-pickle", action="store_true", help="init: the backbone is a pickled model you trust")


def main(args) -> int:
    from mergebench.suites.real import zoo_init

    if args.action == "hash":
        if not args.path:
            print("error: zoo hash PATH [PATH...]", file=sys.stderr)
            return 2
        for path in args.path:
            print(zoo_init.describe_hash(path))
        return 0
    if len(args.path) > 1:
        print("error: zoo init takes one folder", file=sys.stderr)
        return 2
    quick_gelu = True if args.quick_gelu else (False if args.gelu else None)
    try:
        written = zoo_init.init(args.path[0] if args.path else None, args.hf_cache, args.out, args.model,
                                args.model_config, args.backbone, quick_gelu, args.data_root, args.trust_pickle,
                                args.name)
    except ValueError as e:  # zoo_init.InitError, or a --model-config file that is not JSON
        print(f"error: {e}", file=sys.stderr)
        return 2
    incomplete = False
    for path, messages in written:
        print(f"wrote {path}")
        for m in messages:
            print(f"  {m}")
            incomplete |= m.startswith("INCOMPLETE")
        print(f"  next: mergebench run task_arithmetic --suite real --manifest {path} --data-root DATA")
    return 1 if incomplete else 0
