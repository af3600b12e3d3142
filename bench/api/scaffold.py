"""``mergebench new-method NAME``: a ready-to-install plugin package for a new merging method.

The package it writes (``mergebench-NAME/``) works as is: ``pip install -e mergebench-NAME``
registers the method through the ``mergebench.methods`` entry point, ``mergebench check-plugin
NAME`` passes, and ``pytest`` in the package runs the same conformance kit. Edit the merge rule,
the paper and the hyperparameters from there.
"""

from __future__ import annotations

import keyword
import re
from pathlib import Path

from mergebench.api.registry import get_method, list_methods

PYPROJECT = '''[build-system]
requires = ["setuptools>=68", "wheel"]
build-backend = "setuptools.build_meta"

[project]
name = "mergebench-{dash}"
version = "0.1.0"
description = "{display} as a mergebench method plugin"
requires-python = ">=3.10"
dependencies = ["mergebench"]

[project.optional-dependencies]
test = ["pytest>=8"]

# mergebench discovers methods through this entry-point group; the value is the module whose
# @register_method call registers the method.
[project.entry-points."mergebench.methods"]
{name} = "{package}.method"

[tool.setuptools]
packages = ["{package}"]
'''

METHOD = '''"""{display}: a mergebench merging method.

Replace the merge rule below with yours; keep the signature: the merge context first, then the
hyperparameters as keyword arguments with type annotations and the paper's defaults.
"""

from __future__ import annotations

from mergebench import Paper, register_method


@register_method(
    "{name}",
    display_name="{display}",
    needs="nothing",          # or "unlabeled" / "labeled": the context then serves that data, and only that
    adds_params=False,        # True if the merged model stores more than one backbone (masks, adapters, ...)
    family="data-free",
    paper=Paper("TODO: the paper's title", 2026, arxiv=None, venue=None, code="https://example.org/TODO"),
    defaults_source="TODO: where the default hyperparameters come from (paper section, table)",
    hyperparameter_help={{"scaling": "lambda in theta_0 + lambda * sum_t tau_t"}},
    ranges={{"scaling": "[0, inf)"}},  # valid values, checked when a spec is parsed: "(0, 100]", "[1, inf)", ...
)
def {func}(ctx, scaling: float = 0.3):
    """theta = theta_0 + lambda * sum_t tau_t (task arithmetic; replace with your rule)."""
    task_vectors = ctx.task_vectors()              # {{task: theta_t - theta_0}}, new tensors: safe to edit
    merged = ctx.pretrained_weights + scaling * sum(task_vectors.values())
    return ctx.shared_model(merged)                # one merged encoder for every task
'''

TEST = '''"""The mergebench conformance kit on the micro suite (seconds; builds micro once into the cache)."""

from mergebench import check_method


def test_{func}_conforms():
    report = check_method("{name}")
    assert report.ok, report.render()
'''

README = '''# mergebench-{dash}

{display}, a model-merging method for [mergebench](https://github.com/) as an installable plugin.

```bash
pip install -e .                     # registers `{name}` through the mergebench.methods entry point
mergebench check-plugin {name}       # conformance kit on the micro suite; each failure says what to fix
mergebench run {name} --suite mini8  # merge, evaluate, record
mergebench leaderboard --suite mini8 # it appears beside the built-in methods
pytest                               # the same conformance kit as a test
```

Edit `{package}/method.py`: the merge rule, the paper, the hyperparameters (typed, paper defaults).
'''


def new_method(name: str, directory: str | Path = ".", force: bool = False) -> Path:
    """Write the plugin package ``DIRECTORY/mergebench-NAME`` and return its path."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or keyword.iskeyword(name):
        raise ValueError(f"method name {name!r}: use lower-case letters, digits and underscores, starting with a "
                         f"letter (e.g. my_merging)")

    if name in list_methods():
        raise ValueError(f"a method named {name!r} is already registered ({get_method(name).source}); pick another name")
    dash = name.replace("_", "-")
    package = f"mergebench_{name}"
    root = Path(directory) / f"mergebench-{dash}"
    if root.exists() and not force:
        raise FileExistsError(f"{root} exists; remove it or pass --force")
    fields = {"name": name, "dash": dash, "package": package, "func": name,
              "display": " ".join(w.capitalize() for w in name.split("_"))}
    files = {
        "pyproject.toml": PYPROJECT, f"{package}/__init__.py": '"""{display} for mergebench."""\n',
        f"{package}/method.py": METHOD, "tests/test_conformance.py": TEST, "README.md": README,
    }
    for rel, template in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(**fields))
    return root
