"""The package's public face: every exported name resolves, and the calls its docstring shows a
notebook user bind to the functions' real signatures (an example that raises a TypeError on
its first call is the first thing a user meets)."""

import ast
import inspect
import os
import subprocess
import sys
import textwrap

import memrecall

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_exported_name_resolves():
  for name in memrecall.__all__:
    assert getattr(memrecall, name) is not None, name
  assert set(memrecall.__all__) <= set(dir(memrecall))


def test_train_stays_the_function_after_its_subpackage_is_imported():
  """`memrecall.train` names both the function and the training subpackage; a notebook that
  imported one of the subpackage's modules first had got the module."""
  code = ("from memrecall.train import objectives, grpo\n"
          "import memrecall\n"
          "assert callable(memrecall.train), memrecall.train\n"
          "import memrecall.train.state as state\n"  # the module forms work too
          "assert memrecall.train.objectives.RLConfig and state.Ratio\n"
          "import inspect\n"
          "assert list(inspect.signature(memrecall.train).parameters) == "
          "['config', 'workdir', 'log', 'stop_at']\n")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]


def _example_calls(doc: str) -> list[ast.Call]:
  """The `memrecall.NAME(...)` calls of a docstring's indented example."""
  lines = [line for line in doc.splitlines() if line.startswith("    ")]
  tree = ast.parse(textwrap.dedent("\n".join(lines)))
  return [node for node in ast.walk(tree) if isinstance(node, ast.Call)
          and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)
          and node.func.value.id == "memrecall"]


def test_the_package_docstring_calls_bind_to_the_real_signatures():
  calls = _example_calls(memrecall.__doc__)
  assert {c.func.attr for c in calls} >= {"train", "from_workdir", "evaluate_suite", "workdir_run"}
  for call in calls:
    function = getattr(memrecall, call.func.attr)
    # Raises TypeError (a missing required or an unknown argument) as the call would.
    inspect.signature(function).bind(*[None] * len(call.args),
                                     **{k.arg: None for k in call.keywords})
