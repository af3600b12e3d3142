"""``mergebench data check|prepare --root DIR [--tasks A,B] [--verify] [--image-size 224] [--splits test]``: the real
suite's datasets (:mod:`mergebench.suites.datasets`)."""

from __future__ import annotations

HELP = "real-suite datasets: check what is on disk, or prepare the preprocessing cache"


def add_arguments(s) -> None:
    s.add_argument("action", choices=["check", "prepare"])
    s.add_argument("--root", required=True, help="the data root (layouts in datasets/*.yaml)")
    s.add_argument("--tasks", help="comma-separated datasets (default: all eight)")
    s.add_argument("--verify", action="store_true", help="check: also verify md5 checksums of files stored as published")
    s.add_argument("--image-size", type=int, default=224, help="the model's input size (check: the space a prepare "
                                                                "takes at that size)")
    s.add_argument("--splits", default="test", help="prepare: comma-separated splits to cache, or all (default test: "
                                                    "what every run reads; train and val are cached on first use by "
                                                    "the methods that read them)")
    s.add_argument("--workers", type=int, default=None, help="prepare: decoding threads")


def main(args) -> int:
    from mergebench.suites import datasets

    chosen = datasets.chosen_cards(args.root, args.tasks)
    splits = datasets.parse_splits(args.splits)
    if args.action == "check":
        text, complete = datasets.check(args.root, chosen, splits, image_size=args.image_size, verify=args.verify)
        print(text, end="")
        return 0 if complete else 1
    for card in chosen:
        directory = datasets.prepare(args.root, card, splits, image_size=args.image_size, workers=args.workers)
        print(f"{card.name}: {', '.join(splits)} cached in {directory}")
    return 0
