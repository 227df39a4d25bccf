"""Imports point one way: no cycle between modules of src/instructkit and no import up the layers.

A small AST walk, nothing is imported: every `import` / `from ... import` statement counts, at module level or inside
a function (a lazy import still ties the two modules together; it only hides the tie until the function runs), and so
does `importlib.import_module("instructkit....")` with a literal (or f-string) module name. A layer rule holds for
chains of imports too: a module that imports a module that imports model code imports model code.
docs/architecture.md describes the layers this test enforces.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "instructkit"

# Model code: whatever needs a model object or the machinery that trains or samples one.
MODEL_CODE = ("instructkit.models", "instructkit.generation", "instructkit.training", "instructkit.recipes")

# The layer rule, one line per rule: (importers, forbidden targets, exempt importers, why).
# A module matches a prefix when it is that module or lies inside that package. An import from an importer to a target
# is a violation unless the importer is exempt.
LAYER_RULES: list[tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], str]] = [
    # Readers, formats, mixing, dedup and quality filters are tested and used (`instructkit data ...`) without a model.
    (("instructkit.data",), MODEL_CODE, (),
     "data/ reads, converts and filters examples; it must work without torch models, samplers or trainers"),
    # The task bank renders prompts from templates; held-out evaluation (eval/) is what brings a model in.
    (("instructkit.tasks",), MODEL_CODE, (),
     "tasks/ builds prompts and mixtures; scoring them with a model lives in eval/"),
    # Losses are pure functions of tensors; their tests feed hand-made tensors and compare to hand-computed numbers.
    (("instructkit.losses",), MODEL_CODE, (),
     "losses.py holds pure tensor functions; a recipe computes the inputs and calls them"),
    # RL maths (advantages, KL control, rewards, rollout batching) are functions of tensors and text; the recipe owns the
    # policy, the sampler and the reward model and passes their outputs in.
    (("instructkit.rl",), MODEL_CODE, (),
     "rl/ maths must be testable with hand-made tensors, without a model"),
    # Chat templates and rendering are used by data tools, eval, serving and training alike: they sit below all three.
    (("instructkit.chat",), ("instructkit.training", "instructkit.recipes", "instructkit.generation",
                             "instructkit.models"), (),
     "chat/ renders conversations to ids and masks with a tokenizer; it must not depend on model or training code"),
    # Models (loading, LoRA, value heads, export) sit below the runtime and the samplers that use them.
    (("instructkit.models",), ("instructkit.training", "instructkit.generation", "instructkit.recipes"), (),
     "models/ loads and wraps models; training/ and generation/ use it, never the reverse"),
    # The runtime (training/) is shared mechanics: it knows no sampler, server or recipe.
    (("instructkit.training",), ("instructkit.generation", "instructkit.recipes"), (),
     "training/ is the mechanics every recipe shares; speed paths of the decode step must not leak into it"),
    # Sampling and serving know no trainer and no recipe.
    (("instructkit.generation",), ("instructkit.training", "instructkit.recipes"), (),
     "generation/ samples from a model; it does not train"),
    # Evaluation scores models; it does not train them or run recipes.
    (("instructkit.eval",), ("instructkit.training", "instructkit.recipes"), (),
     "eval/ scores models and writes reports; it runs no recipe"),
    # A recipe is a leaf: only the CLI runs recipes, and one pipeline module, recipes/instructgpt.py, composes the
    # SFT, reward-model and PPO recipes into the InstructGPT pipeline. A recipe imports no other recipe otherwise.
    (("instructkit",), ("instructkit.recipes",), ("instructkit.cli", "instructkit.recipes.instructgpt"),
     "nothing imports a recipe except the CLI and the pipeline module recipes/instructgpt.py"),
    # The config module is the bottom layer every other module reads; it imports no other part of the package.
    (("instructkit.config",), ("instructkit.data", "instructkit.tasks", "instructkit.chat", "instructkit.losses",
                               "instructkit.rl", "instructkit.eval") + MODEL_CODE, (),
     "config.py is read by everything; it imports nothing of the package"),
]


def _inside(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The longest known module that `name` (a module, or a module plus an attribute) names; None outside the package."""
    while name:
        if name in MODULES:
            return name
        if "." not in name:
            return None
        name = name.rsplit(".", 1)[0]
    return None


def _literal_prefix(node: ast.expr) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return str(node.values[0].value).rstrip(".")
    return None


def imports_of(module: str) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "", line) for every import of the package in `module`'s file."""
    path = MODULES[module]
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name)
                if target:
                    found.append((target, "", node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                target = _resolve(f"{base}.{alias.name}")
                if target and target != f"{base}.{alias.name}" or not target:
                    target = _resolve(base)  # `from pkg.mod import name`: the module is pkg.mod
                    name = alias.name
                else:
                    name = ""  # `from pkg import submodule`
                if target:
                    found.append((target, name, node.lineno))
        elif (isinstance(node, ast.Call) and node.args
              and (getattr(node.func, "attr", None) == "import_module" or getattr(node.func, "id", None) in
                   ("import_module", "__import__"))):
            prefix = _literal_prefix(node.args[0])
            target = _resolve(prefix) if prefix else None
            if target:
                found.append((target, "", node.lineno))
    return [(t, n, line) for t, n, line in found if t != module]


GRAPH = {m: imports_of(m) for m in MODULES}


def _where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(SRC.parent)}:{line}"


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w, _, _ in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return out


def layer_violations() -> list[str]:
    """Imports against LAYER_RULES, direct or through a chain of imports (importing a module that imports model code
    imports model code): one line per (module, forbidden module first reached), with the shortest chain. A chain does
    not continue through a module the rule exempts (the CLI may import recipes, so what imports the CLI is not
    charged with them)."""
    out = []
    for module in sorted(GRAPH):
        for importers, forbidden, exempt, why in LAYER_RULES:
            if not any(_inside(module, p) for p in importers) or any(_inside(module, p) for p in exempt):
                continue
            # breadth first from `module`: the first edge that enters forbidden code ends that chain
            parent: dict[str, tuple[str, int]] = {}
            queue, seen = [module], {module}
            while queue:
                current = queue.pop(0)
                for target, _, line in GRAPH[current]:
                    if target in seen or _inside(target, module):  # a package may import its own submodules
                        continue
                    seen.add(target)
                    parent[target] = (current, line)
                    if any(_inside(target, f) for f in forbidden):
                        chain, node = [target], target
                        while node != module:
                            node = parent[node][0]
                            chain.append(node)
                        chain.reverse()
                        first_line = parent[chain[1]][1]
                        out.append(f"{_where(module, first_line)}: {' -> '.join(chain)} ({why})")
                    elif not any(_inside(target, e) for e in exempt):
                        queue.append(target)
    return sorted(set(out))


def private_imports() -> list[str]:
    """`from a.b import _x` where a.b is in another package than the importer (a private name leaking out)."""
    out = []
    for module, edges in GRAPH.items():
        own_package = module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]
        for target, name, line in edges:
            if not name.startswith("_") or name.startswith("__"):
                continue
            target_package = target if MODULES[target].name == "__init__.py" else target.rsplit(".", 1)[0]
            if target_package != own_package:
                out.append(f"{_where(module, line)}: {module} imports the private name {name} from {target}")
    return sorted(out)


def test_the_walk_sees_the_package():
    # guards against a test that passes because it read nothing: known modules and known edges are found
    assert "instructkit.cli" in MODULES and "instructkit.losses" in MODULES and len(MODULES) > 50
    assert any(t == "instructkit.recipes" or t.startswith("instructkit.recipes.") for t, _, _ in
               GRAPH["instructkit.cli.rlhf"])  # importlib.import_module(f"instructkit.recipes.{module}")
    assert any(t == "instructkit.config" for t, _, _ in GRAPH["instructkit.cli.train"])  # a function-level import


def test_no_import_cycle():
    cycles = _cycles()
    lines = []
    for comp in cycles:
        members = set(comp)
        for m in comp:
            for t, _, line in GRAPH[m]:
                if t in members:
                    lines.append(f"  {_where(m, line)}: {m} -> {t}")
    assert not cycles, "import cycles (each group imports itself through the edges listed):\n" + "\n".join(lines)


def test_imports_follow_the_layers():
    bad = layer_violations()
    assert not bad, "imports against the layer rule (tests/test_layering.py, LAYER_RULES):\n" + "\n".join(bad)


def test_no_private_name_crosses_a_package():
    bad = private_imports()
    assert not bad, "private names imported from another package (make them public or move them):\n" + "\n".join(bad)


def test_a_chain_of_imports_counts(monkeypatch):
    # data -> (a helper) -> models: data reaches model code through the helper; the line names the whole chain
    monkeypatch.setitem(GRAPH, "instructkit.data.schema",
                        GRAPH["instructkit.data.schema"] + [("instructkit.eval.contamination", "x", 1)])
    monkeypatch.setitem(GRAPH, "instructkit.eval.contamination",
                        GRAPH["instructkit.eval.contamination"] + [("instructkit.models.load", "y", 2)])
    bad = [v for v in layer_violations() if v.startswith("src/instructkit/data/schema.py:1:")]
    assert bad and "instructkit.data.schema -> instructkit.eval.contamination -> instructkit.models.load" in bad[0]


@pytest.mark.parametrize("source, expected", [
    ("import instructkit.models.load\n", [("instructkit.models.load", "", 1)]),
    ("from instructkit.models import load\n", [("instructkit.models.load", "", 1)]),
    ("def f():\n    from instructkit.models.load import resolve_path\n", [("instructkit.models.load", "resolve_path", 2)]),
    ("from ..models.tiny import _CORPUS\n", [("instructkit.models.tiny", "_CORPUS", 1)]),
    ("import importlib\nimportlib.import_module(f'instructkit.recipes.{x}')\n", [("instructkit.recipes", "", 2)]),
])
def test_the_walk_reads_each_kind_of_import(tmp_path, monkeypatch, source, expected):
    fake = tmp_path / "instructkit" / "chat" / "fake.py"
    fake.parent.mkdir(parents=True)
    fake.write_text(source, encoding="utf-8")
    monkeypatch.setitem(MODULES, "instructkit.chat.fake", fake)
    assert imports_of("instructkit.chat.fake") == expected
