"""Method specs: ``"surgery(base=adamerging_layerwise(lr=0.001), rank=16)"`` as a tree of calls.

An add-on method (one with a ``base`` hyperparameter) runs on top of the model its base
method returns. The canonical string of a resolved call names every hyperparameter, so it is
what a record stores and what the config hash covers.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Any

from mergebench.api.registry import BUDGETS, HyperparameterError, close_matches, get_method


@dataclass(frozen=True)
class MethodCall:
    name: str
    hparams: dict = field(default_factory=dict)  # base -> MethodCall; the rest plain values

    @classmethod
    def parse(cls, text: str | "MethodCall") -> "MethodCall":
        if isinstance(text, MethodCall):
            return text
        try:
            tree = ast.parse(text.strip(), mode="eval").body
        except SyntaxError as e:
            raise HyperparameterError(f"cannot parse method spec {text!r}: write name or name(key=value, base=other)") from e
        return cls._from_node(tree, text)

    @classmethod
    def _from_node(cls, node, text) -> "MethodCall":
        if isinstance(node, ast.Name):
            return cls(node.id)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args:
            hp = {}
            for kw in node.keywords:
                if kw.arg is None or kw.arg in hp:
                    raise HyperparameterError(
                        f"method spec {text!r} sets {kw.arg or '**'} more than once in {node.func.id}(...); "
                        f"give each hyperparameter once")
                if kw.arg == "base":
                    hp["base"] = cls._from_node(kw.value, text)
                elif isinstance(kw.value, ast.Name):
                    hp[kw.arg] = kw.value.id
                else:
                    try:
                        hp[kw.arg] = ast.literal_eval(kw.value)
                    except ValueError as e:
                        raise HyperparameterError(f"{kw.arg}= in {text!r} must be a literal value") from e
            return cls(node.func.id, hp)
        raise HyperparameterError(f"cannot parse method spec {text!r}: write name or name(key=value, base=other)")

    def with_hparams(self, **overrides) -> "MethodCall":
        return MethodCall(self.name, {**self.hparams, **overrides})

    def resolve(self) -> "MethodCall":
        """Every hyperparameter filled with its default, parsed to its type; unknown ones are errors."""
        spec = get_method(self.name)
        unknown = [k for k in self.hparams if k not in spec.hyperparameters]
        if unknown:
            raise HyperparameterError(
                f"{self.name} has no hyperparameter {unknown[0]!r}{close_matches(unknown[0], spec.hyperparameters)}"
                f" (it takes: {', '.join(spec.hyperparameters) or 'none'})")
        resolved = {}
        for name, hp in spec.hyperparameters.items():
            value = self.hparams.get(name, hp.default)
            if name == "base":
                value = MethodCall.parse(value).resolve()
            else:
                value = hp.parse(value)
                hp.check(value, self.name)  # its declared range (register_method(..., ranges=...))
            resolved[name] = value
        return MethodCall(self.name, resolved)

    def with_budget(self, budget: str = "paper") -> "MethodCall":
        """The call under a named budget (``registry.BUDGETS``): ``"paper"`` keeps the defaults (the paper's);
        ``"smoke"`` fills every stage's smoke values (bases included) where the call does not set them."""
        if budget not in BUDGETS:
            raise HyperparameterError(f"unknown budget {budget!r}; use one of {', '.join(BUDGETS)}")
        if budget == "paper":
            return self
        spec = get_method(self.name)
        hparams = {**{k: v for k, v in spec.smoke.items() if k not in self.hparams}, **self.hparams}
        if spec.is_addon:
            hparams["base"] = MethodCall.parse(hparams.get("base", spec.hyperparameters["base"].default)).with_budget(budget)
        return MethodCall(self.name, hparams)

    def below_paper_budget(self) -> list[str]:
        """Of a resolved call: ``["surgery: steps=5 < 500", ...]``, each stage's budget values below its paper's."""
        return [f"{stage.name}: {gap}" for stage in self.stages() for gap in get_method(stage.name).below_paper(stage.hparams)]

    def stages(self) -> list["MethodCall"]:
        """The pipeline from the innermost base outwards."""
        base = self.hparams.get("base")
        return (base.stages() if isinstance(base, MethodCall) else []) + [self]

    def needs(self) -> set[str]:
        return set().union(*(get_method(stage.name).all_needs for stage in self.stages()))

    def plain_hparams(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, MethodCall) else v) for k, v in self.hparams.items()}

    def __str__(self) -> str:
        if not self.hparams:
            return self.name
        args = ", ".join(f"{k}={v}" if isinstance(v, MethodCall) else f"{k}={v!r}" for k, v in sorted(self.hparams.items()))
        return f"{self.name}({args})"
