"""The import graph of `jft/`, read with `ast`: no circles, function-local imports and
`importlib.import_module("jft...")` included, and a model file never names `jft.peft`.

(The layering of DESIGN.md, "Layers", is the goal; this test holds what is true today, so a new
circle cannot come back unseen. Function-local imports of jft outside the CLI remain (listed by
`local_imports`), to go as the package is laid out in layers.)
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
