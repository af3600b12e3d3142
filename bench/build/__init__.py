"""The build tool: how mini8's committed artifacts were made (``mergebench build SUITE --artifact``, ``make
mini8-artifact``) and how other configurations are built and screened (the probes in ``scripts/``).

- :mod:`.train`: the fine-tuning routine (cross-entropy against a cosine classifier, AdamW, warmup + cosine);
- :mod:`.mini8`: data, pretraining, heads, the experts fine-tuned in a process pool, the artifact;
- :mod:`.mini8_lora`: the LoRA experts of mini8-lora and micro-lora;
- :mod:`.artifact`: writing an artifact folder and its manifest.

The loaded suites (:mod:`mergebench.suites.mini8`) never import this package; it imports them, to write what they
load.
"""
