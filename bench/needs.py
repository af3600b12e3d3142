"""The kinds of data a method may ask its context for, in order of how much a method sees: the method API declares
them (``register_method(needs=...)``), records list them, leaderboards filter and colour by them."""

# "labeled" implies the unlabeled images too.
NEEDS = {
    "nothing": "weights only (data-free)",
    "unlabeled": "unlabeled images of each task (test-time or exemplars)",
    "labeled": "labeled images of each task (training or validation split)",
    "sequential": "experts arrive one at a time (continual merging)",
}
