"""The import graph of `jft/`, read with `ast` (function-local imports and
`importlib.import_module("jft...")` included): no circles, no upward import between the layers of
`jft/__init__.py`'s docstring, function-local jft imports only in the CLI, and a model file never
names `jft.peft`.
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules() -> dict:
  out = {}
  for folder, _, names in os.walk(os.path.join(ROOT, "jft")):
    for name in names:
      if name.endswith(".py"):
        parts = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].split(os.sep)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = os.path.join(folder, name)
  return out


def _resolve(name: str, modules: dict) -> str | None:
  while name and name not in modules:
    name = name.rpartition(".")[0]
  return name or None


def import_graph() -> dict:
  """module -> {module it imports: line}, from every import statement (at any depth) and every
  `importlib.import_module("jft...")` with a literal name."""
  modules, graph = _modules(), {}
  for module, path in modules.items():
    tree = ast.parse(open(path).read())
    edges = graph.setdefault(module, {})
    for node in ast.walk(tree):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
          for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
          base = package + ("." + base if base else "")
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
      elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
            and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        names = [node.args[0].value]
      for name in names:
        target = _resolve(name, modules) if name.split(".")[0] == "jft" else None
        if target and target != module:
          edges.setdefault(target, node.lineno)
  return graph


def _cycles(graph: dict) -> list:
  index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in list(graph):
    if v not in index:
      visit(v)
  return found


def test_the_package_has_no_import_circles():
  graph = import_graph()
  circles = _cycles(graph)
  edges = [f"{a} -> {b} (line {graph[a][b]})" for c in circles for a in c for b in graph[a] if b in c]
  assert not circles, "import circles:\n" + "\n".join(edges)


# The layer of each top-level entry of jft/ (a folder or a module): an entry imports only from its own
# layer or below. The same table is drawn in jft/__init__.py and README "Layout".
LAYERS = {"core": 0, "quant": 1, "data": 1, "models": 2, "peft": 3, "objectives": 4, "config": 5, "run": 6,
          "studies": 7, "serve": 7, "cli": 8}


def _entry(module: str) -> str:
  return module.split(".")[1] if "." in module else ""


def test_every_entry_of_the_package_has_a_layer_and_there_are_at_most_twelve():
  entries = sorted(n[:-3] if n.endswith(".py") else n for n in os.listdir(os.path.join(ROOT, "jft"))
                   if not n.startswith(("_", ".")) or n == "__init__.py")
  entries = [e for e in entries if e != "__init__"]
  assert sorted(entries) == sorted(LAYERS), "jft/ entries and LAYERS differ"
  assert len(entries) + 1 <= 12, entries  # + __init__.py


def upward_imports(graph: dict) -> list[str]:
  out = []
  for module, edges in graph.items():
    if module == "jft":
      continue
    for target, line in edges.items():
      if target == "jft":
        continue
      if LAYERS[_entry(target)] > LAYERS[_entry(module)]:
        out.append(f"{module} (layer {LAYERS[_entry(module)]}) -> {target} (layer {LAYERS[_entry(target)]}), "
                   f"line {line}")
  return sorted(out)


def test_no_module_imports_from_a_layer_above_its_own():
  found = upward_imports(import_graph())
  assert not found, "upward imports:\n" + "\n".join(found)


def local_imports() -> list[str]:
  """Imports of jft inside a function or class, and importlib calls naming a jft module, outside the
  CLI and the package's lazy names (`jft/__init__.py`). A package importing its own modules to register
  them (`f"{__name__}.{name}"`, objectives/ and peft/) names no module and is not one."""
  out = []
  for module, path in _modules().items():
    if module == "jft" or module.startswith("jft.cli"):
      continue
    tree = ast.parse(open(path).read())
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        names = [node.module or ""] if not node.level else ["jft"]
      elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
            and node.args and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("jft")):
        out.append(f"{path}:{node.lineno} importlib names {node.args[0].value}")
        continue
      if any(n.split(".")[0] == "jft" for n in names) and id(node) not in top:
        out.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} imports {', '.join(names)} inside a function")
  return out


def test_jft_imports_its_modules_by_their_current_names():
  """The former names (`jft._MOVED`) are for users' code; inside jft/ they would hide an edge from the graph."""
  import jft

  found = []
  for module, path in _modules().items():
    for node in ast.walk(ast.parse(open(path).read())):
      names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
          [node.module] + [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) and \
          node.module and not node.level else []
      found += [f"{os.path.relpath(path, ROOT)}:{node.lineno} imports {n}" for n in names if n in jft._MOVED]
  assert not found, "\n".join(found)


def test_function_local_jft_imports_live_only_in_the_cli():
  found = local_imports()
  assert not found, "\n".join(found)


def test_the_layer_checks_see_an_upward_and_a_local_import(tmp_path, monkeypatch):
  """The checks themselves: a model importing the run layer inside a function is named twice."""
  pkg = tmp_path / "jft"
  (pkg / "models").mkdir(parents=True)
  (pkg / "run").mkdir()
  for init in (pkg / "__init__.py", pkg / "models" / "__init__.py", pkg / "run" / "__init__.py"):
    init.write_text("")
  (pkg / "run" / "train.py").write_text("x = 1\n")
  (pkg / "models" / "gpt2.py").write_text("def f():\n  from jft.run import train\n")
  monkeypatch.setattr(__import__(__name__), "ROOT", str(tmp_path))
  assert upward_imports(import_graph()) == ["jft.models.gpt2 (layer 2) -> jft.run.train (layer 6), line 2"]
  assert local_imports() == ["jft/models/gpt2.py:2 imports jft.run inside a function"]


def test_a_model_never_names_the_methods():
  for module, path in _modules().items():
    if module.startswith("jft.models"):
      assert "jft.peft" not in open(path).read(), f"{path} names jft.peft"
      assert not any(t.startswith("jft.peft") for t in import_graph()[module]), module


def test_the_graph_sees_function_local_and_importlib_imports(tmp_path, monkeypatch):
  """The reader itself: a circle made only of a function-local import and an importlib call is found."""
  pkg = tmp_path / "jft"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "a.py").write_text("def f():\n  from jft import b\n")
  (pkg / "b.py").write_text("import importlib\nimportlib.import_module('jft.a')\n")
  monkeypatch.setattr(__import__(__name__), "ROOT", str(tmp_path))
  assert _cycles(import_graph()) == [["jft.a", "jft.b"]]


def test_the_former_module_names_still_answer():
  """Every module of the flat layout imports under its old name as the same module object (old scripts,
  configs, `python -m jft.host_memory`); `jft.align` is the objectives package with every loss."""
  import importlib
  import subprocess
  import sys

  import jft

  for old, new in jft._MOVED.items():
    assert importlib.import_module(old) is importlib.import_module(new), old
  from jft import align, loss, sweep, train  # `from jft import NAME`, as configs and scripts wrote it

  assert (align.preference_loss, align.sequence_logps) == (importlib.import_module("jft.objectives.losses").preference_loss,
                                                           importlib.import_module("jft.objectives.losses").sequence_logps)
  assert train.train is importlib.import_module("jft.run.train").train and loss.model_logps and sweep.Space
  out = subprocess.run([sys.executable, "-m", "jft.host_memory", sys.executable, "-c", "print('ran')"],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and out.stdout.strip() == "ran", out.stderr[-500:]
