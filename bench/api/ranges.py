"""Declared ranges of hyperparameters, in interval notation: ``"(0, 100]"``, ``"[0, inf)"``, ``"[1, inf)"``.

A method declares them in ``register_method(..., ranges={"k": "(0, 100]", "scaling": "[0, inf)"})``; a value
outside its range is an error when the method spec is resolved (``MethodCall.resolve``: the command line, a
sweep grid, ``--tune`` values), before any work, naming the method, the value and the range. ``None`` (for an
``Optional`` hyperparameter: "select it" or "off") is always accepted.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_NUMBER = r"[-+]?(?:inf|\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)"
_INTERVAL = re.compile(rf"^\s*([\[(])\s*({_NUMBER})\s*,\s*({_NUMBER})\s*([\])])\s*$")


@dataclass(frozen=True)
class Interval:
    low: float
    high: float
    low_closed: bool
    high_closed: bool

    @classmethod
    def parse(cls, text: str) -> "Interval":
        """``"(0, 100]"``: ``(`` / ``)`` exclude the bound, ``[`` / ``]`` include it, ``inf`` for no bound."""
        m = _INTERVAL.match(str(text))
        if not m:
            raise ValueError(f"range {text!r} is not an interval: write e.g. '(0, 100]', '[0, inf)' or '[1, inf)'")
        low, high = float(m.group(2)), float(m.group(3))
        if low > high or (low == high and not (m.group(1) == "[" and m.group(4) == "]")):
            raise ValueError(f"range {text!r} is empty")
        if (math.isinf(low) and m.group(1) == "[") or (math.isinf(high) and m.group(4) == "]"):
            raise ValueError(f"range {text!r}: an infinite bound is open, write '(-inf' or 'inf)'")
        return cls(low, high, m.group(1) == "[", m.group(4) == "]")

    def __contains__(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return False
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return above and below

    def __str__(self) -> str:
        def bound(x):
            return ("-inf" if x < 0 else "inf") if math.isinf(x) else f"{x:g}"
        return f"{'[' if self.low_closed else '('}{bound(self.low)}, {bound(self.high)}{']' if self.high_closed else ')'}"
