"""The package's layers, and a check of every import in its source against them.

Each subpackage may import only itself and the layers its __init__ docstring lists in its
"May import:" sentence, which is where they are written down, once; every one of them sits lower
in LAYERS. The modules at the top of the package (errors, storage, hosts) are the floor every layer stands on. The walk reads imports with
`ast`, including those inside functions, so a lazy import cannot hide an arrow running upward.
"""
from __future__ import annotations

import ast
import pathlib
import re

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "rlhf_jax"

FLOOR = {"errors", "storage", "hosts"}  # imported by every layer
LAYERS = ("model", "data", "objectives", "training", "hf", "trainers", "evals", "analysis", "experiments")


def declared_imports(docstring: str) -> set[str]:
  """The layers a subpackage's __init__ docstring allows it to import: its "May import:" sentence
  (parenthetical remarks dropped; "every other layer" for the top)."""
  text = docstring.split("May import:", 1)[1].split("\n\n", 1)[0]
  text = re.sub(r"\([^)]*\)", "", " ".join(text.split())).strip().rstrip(".")
  if text == "every other layer":
    return set(LAYERS)
  return {word.strip() for word in text.split(",")} - FLOOR


def _allowed() -> dict[str, set[str]]:
  """Each layer's allowed imports, written once: in the docstring of its __init__."""
  return {layer: declared_imports(ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text())) or "")
          for layer in LAYERS}


ENTRY = {"jobs", "__main__"}  # the command line: may import any layer
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
  """(line, module) of every import of the package in a file, wherever it sits in the file."""
  found = []
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.Import):
      found += [(node.lineno, a.name) for a in node.names if a.name.startswith("rlhf_jax")]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("rlhf_jax"):
      found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
  return found


def _layer(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else ""


def upward_imports(modules: dict[str, pathlib.Path], allowed: dict[str, set[str]]) -> list[str]:
  bad = []
  for name, path in modules.items():
    mine = _layer(name)
    for line, target in _imports(path):
      theirs = _layer(target)
      if not theirs or theirs == mine or theirs in FLOOR or mine in ENTRY:
        continue
      if mine in FLOOR or theirs not in allowed.get(mine, set()):
        bad.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {mine or name} imports {target} ({theirs})")
  return bad


def import_cycles(modules: dict[str, pathlib.Path]) -> list[list[str]]:
  """Cycles between modules (depth-first search over the import graph, imports resolved to the
  module that defines them)."""
  graph = {}
  for name, path in modules.items():
    targets = set()
    for _, target in _imports(path):
      while target and target not in modules:
        target = target.rpartition(".")[0]
      if target and target != name and not name.startswith(target + "."):
        targets.add(target)
    graph[name] = sorted(targets)
  cycles, state = [], {}

  def visit(node, stack):
    state[node] = "open"
    for nxt in graph[node]:
      if state.get(nxt) == "open":
        cycles.append(stack[stack.index(nxt):] + [nxt])
      elif nxt not in state:
        visit(nxt, stack + [nxt])
    state[node] = "done"

  for node in graph:
    if node not in state:
      visit(node, [node])
  return cycles


def test_every_subpackage_is_a_layer_that_declares_what_it_may_import():
  layers = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
  assert layers == set(LAYERS), "a new subpackage needs its place in LAYERS and a 'May import:' docstring"
  allowed = _allowed()
  for i, layer in enumerate(LAYERS):  # only downward: nothing declared from a layer listed after it
    assert allowed[layer] - {layer} <= set(LAYERS[:i]), layer
  assert allowed["model"] == allowed["data"] == set()


def test_declared_imports_are_read_from_the_docstring():
  assert declared_imports("x.\nMay import: errors, model,\ndata, training (the CLI).\n\nmore") == {"model", "data", "training"}
  assert declared_imports("Top. May import: every other layer.") == set(LAYERS)


def test_no_import_runs_up_a_layer():
  assert upward_imports(_modules(), _allowed()) == []


def test_no_import_cycles():
  assert import_cycles(_modules()) == []


def test_the_checks_catch_what_they_look_for(tmp_path, monkeypatch):
  """A fake package with one upward arrow and one circle: both are reported."""
  pkg = tmp_path / "rlhf_jax"
  for layer in ("model", "trainers"):
    (pkg / layer).mkdir(parents=True)
    (pkg / layer / "__init__.py").write_text('"""x"""\n')
  (pkg / "model" / "a.py").write_text("def f():\n  from rlhf_jax.trainers import b\n")
  (pkg / "trainers" / "b.py").write_text("from rlhf_jax.trainers.c import x\n")
  (pkg / "trainers" / "c.py").write_text("from rlhf_jax.trainers import b\nx = 1\n")
  monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
  modules = _modules()
  assert upward_imports(modules, {"model": set(), "trainers": {"model"}}) == ["rlhf_jax/model/a.py:2: model imports rlhf_jax.trainers.b (trainers)"]
  assert sorted(map(tuple, import_cycles(modules))) == [("rlhf_jax.trainers.b", "rlhf_jax.trainers.c",
                                                         "rlhf_jax.trainers.b")]


def test_modules_and_functions_stay_short():
  long_modules, long_functions = [], []
  for name, path in _modules().items():
    text = path.read_text(encoding="utf-8")
    if text.count("\n") > MAX_MODULE_LINES:
      long_modules.append(f"{name}: {text.count(chr(10))} lines")
    for node in ast.walk(ast.parse(text)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = node.end_lineno - node.lineno + 1
        if n > MAX_FUNCTION_LINES:
          long_functions.append(f"{name}.{node.name}: {n} lines")
  assert long_modules == [] and long_functions == []
