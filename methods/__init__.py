"""Built-in merging methods. Importing this package registers them all (one module per family)."""

from mergebench.methods import baselines, ties  # noqa: F401
from mergebench.methods import cat, dare, doge, fisher, iso, lot, regmean, tall, tsv, wudi  # noqa: F401,E402  (data-free and closed-form)
from mergebench.methods import adamerging, intervmerge, surgery  # noqa: F401,E402  (test-time adaptation)
from mergebench.methods import rmm  # noqa: F401,E402  (layer-wise search on labeled validation data)
from mergebench.methods import adarank, concrete  # noqa: F401,E402  (test-time adaptation: learned masks)
from mergebench.methods import continual  # noqa: F401,E402  (sequential: experts arrive one at a time)
from mergebench.methods import copa  # noqa: F401,E402  (LoRA experts)
