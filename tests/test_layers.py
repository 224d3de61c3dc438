"""The package's import graph: layers by role, imports only downward, no cycles.

Walks every `import` in `memrecall/` (module level and inside functions) with `ast`, so a
violation fails here before it becomes a cycle at import time.  The layers, lowest first:

  runtime     sharding, distributed processes, checkpoints, files      (imports no memrecall)
  models      Qwen2, attention, sampling, HF checkpoints, tokenizers
  data        examples, datasets, metrics, documents
  method      compressor, gate, reasoner, recall loop, memory banks
  readers     every way a question reads a document, by name
  run_builder a config -> a frozen `Run`
  train       stages, objectives, the trainer          evaluate  evaluator, reports, benchmark
  capacity    deviceless compiles and memory plans     demo      the end-to-end demo
  __init__    the public face

A unit imports only units in lower layers (never a sibling of its own layer) and modules of
its own package; inside a function only where that keeps a heavy optional dependency out of
the import (`FUNCTION_LEVEL_ALLOWED`).
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "memrecall"
LAYERS = (("runtime",), ("models",), ("data",), ("method",), ("readers",), ("run_builder",),
          ("train", "evaluate"), ("capacity", "demo"), ("__init__",))
# (importer, imported): function-level imports that keep an optional dependency lazy.
FUNCTION_LEVEL_ALLOWED = {
    ("memrecall.data.specs", "memrecall.data.tfds_builders"),  # tensorflow_datasets
    # The callable package: importing one of its modules must not load the trainer.
    ("memrecall.train", "memrecall.train.trainer"),
}


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: pathlib.Path, modules) -> list[tuple[str, int, bool]]:
  """(imported module, line, at module level) for every memrecall/launch import in `path`."""
  tree = ast.parse(path.read_text())
  top_level = {id(node) for node in tree.body}
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      # `from a.b import c`: c is a module when a.b.c is one, else a name in a.b.
      targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                 else node.module for a in node.names]
    else:
      continue
    for target in targets:
      if target.split(".")[0] in ("memrecall", "launch"):
        found.append((target, node.lineno, id(node) in top_level))
  return found


def _unit(module: str) -> str:
  parts = module.split(".")
  return "__init__" if len(parts) == 1 else parts[1]


def _layer(unit: str) -> int:
  for i, units in enumerate(LAYERS):
    if unit in units:
      return i
  raise AssertionError(f"memrecall.{unit} is in no layer: add it to LAYERS in {__file__}")


def _graph() -> dict[str, list[tuple[str, int, bool]]]:
  modules = _modules()
  return {name: _imports(path, modules) for name, path in modules.items()}


def test_every_import_points_down():
  problems = []
  for module, imports in _graph().items():
    for target, line, _ in imports:
      where = f"{module} (line {line}) imports {target}"
      if target.startswith("launch"):
        problems.append(f"{where}: the library never imports a launcher")
        continue
      if target == "memrecall":
        problems.append(f"{where}: import the module itself, not the public face")
        continue
      own, other = _unit(module), _unit(target)
      if own != other and _layer(other) >= _layer(own):
        problems.append(f"{where}: {other} is not below {own}")
  assert not problems, "\n".join(problems)


def test_no_cycles():
  graph = {m: sorted({t for t, _, _ in imports if t in _modules()})
           for m, imports in _graph().items()}
  state, cycles = {}, []

  def visit(node, path):
    state[node] = "open"
    for nxt in graph[node]:
      if state.get(nxt) == "open":
        cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
      elif nxt not in state:
        visit(nxt, path + [nxt])
    state[node] = "done"

  for node in graph:
    if node not in state:
      visit(node, [node])
  assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_function_level_imports_only_for_optional_dependencies():
  late = [f"{module} (line {line}) imports {target} inside a function"
          for module, imports in _graph().items() for target, line, top in imports
          if not top and (module, target) not in FUNCTION_LEVEL_ALLOWED]
  assert not late, "\n".join(late)


@pytest.mark.parametrize("unit", sorted({u for units in LAYERS for u in units} - {"__init__"}))
def test_every_layer_exists(unit):
  assert (PACKAGE / unit).is_dir() or (PACKAGE / f"{unit}.py").is_file()


def test_the_public_face_names_what_its_modules_define_and_imports_nothing_eagerly():
  code = ("import sys, memrecall; loaded = [m for m in sys.modules if m.startswith('memrecall.')];"
          "print(len(loaded)); [getattr(memrecall, n) for n in memrecall.__all__]")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=PACKAGE.parent)
  assert out.stdout.split() == ["0"]  # `import memrecall` alone loads no submodule
  import memrecall  # pylint: disable=g-import-not-at-top
  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    memrecall.nope  # pylint: disable=pointless-statement
