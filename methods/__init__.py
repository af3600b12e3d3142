"""Built-in merging methods. Importing this package registers them all (one module per family)."""

from mergebench.methods import baselines, ties  # noqa: F401
