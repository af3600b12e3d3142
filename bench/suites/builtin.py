"""The built-in suites: importing this module registers them (one line per suite module)."""

from mergebench.suites import mini8  # noqa: F401  (mini8, micro, mini8-lora, micro-lora)
from mergebench.suites import real  # noqa: F401  (real: your backbone, experts and datasets)
from mergebench.suites import synthetic  # noqa: F401  (synthetic-vitb32, -vitb16, -vitl14, -tiny: speed only)
