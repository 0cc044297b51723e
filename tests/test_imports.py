"""The package's structure: no import cycles (imports inside functions included), no
function over 80 lines, no file over 600 lines.

Module A depends on module B when A imports B or a name from B (`from B import
name`, where `B.name` is a module: on that module). A package's `__init__`
re-exporting its own submodules makes the package depend on them, not them on
the package, so a submodule that imports its own package's `__init__` closes a
cycle.
"""

import ast
import os

from conftest import REPO

PACKAGE = "dlrm_jax"
SRC = os.path.join(REPO, "src")
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 600


def _modules() -> dict[str, str]:
  """Module name -> file path, for every module of the package."""
  out = {}
  root = os.path.join(SRC, PACKAGE)
  for dirpath, _, files in os.walk(root):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(dirpath, f), SRC)[:-3].split(os.sep)
        if rel[-1] == "__init__":
          rel = rel[:-1]
        out[".".join(rel)] = os.path.join(dirpath, f)
  return out


def _dependencies(name: str, path: str, modules: dict[str, str]) -> set[str]:
  is_package = path.endswith("__init__.py")
  here = name if is_package else name.rpartition(".")[0]
  deps = set()
  with open(path) as f:
    tree = ast.parse(f.read())
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      deps |= {a.name for a in node.names if a.name in modules}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = here.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      for a in node.names:
        sub = f"{base}.{a.name}"
        if sub in modules:
          deps.add(sub)
        elif base in modules:
          deps.add(base)
  deps.discard(name)
  return deps


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_no_import_cycles():
  modules = _modules()
  graph = {m: _dependencies(m, p, modules) for m, p in modules.items()}
  assert "dlrm_jax.trainer" in graph and graph["dlrm_jax.trainer"]  # the scan sees imports
  assert _cycles(graph) == []


def test_the_cycle_check_sees_a_cycle_through_a_function_body():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert _cycles(graph) == [["a", "b", "c"]]


def test_no_function_or_file_too_long():
  too_long = []
  for name, path in sorted(_modules().items()):
    with open(path) as f:
      text = f.read()
    lines = text.count("\n")
    if lines > MAX_FILE_LINES:
      too_long.append(f"{name}: {lines} lines")
    for node in ast.walk(ast.parse(text)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = node.end_lineno - node.lineno + 1
        if n > MAX_FUNCTION_LINES:
          too_long.append(f"{name}.{node.name}: {n} lines")
  assert too_long == []


def test_the_package_imports_the_same_from_any_directory(tmp_path):
  """From the folder above a clone named dlrm_jax that holds the user's data/ (the
  README's place for prepared data), the current directory comes first on sys.path:
  the installed package must import, not the clone's root as a namespace package
  (whose data/ then hides the package's dlrm_jax.data)."""
  import subprocess
  import sys

  import dlrm_jax

  (tmp_path / "dlrm_jax" / "data" / "criteo_kaggle").mkdir(parents=True)
  proc = subprocess.run(
      [sys.executable, "-c", "import dlrm_jax, dlrm_jax.trainer; print(dlrm_jax.__file__)"],
      cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == dlrm_jax.__file__
