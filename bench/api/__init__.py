"""The method API: what a merging method is written against. The registry (``register_method``, variants,
plugins), the merge context and its declared data, weights arithmetic, hyperparameter ranges and budgets, method
specs (pipelines), the merged-model types, LoRA factors, and the tools for method authors (the conformance kit,
the plugin scaffold, the reference pages)."""
