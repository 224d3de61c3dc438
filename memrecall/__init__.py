"""memrecall: compressed-memory long-context reasoning in JAX/Flax.

What a notebook needs, by name (each loads its module on first use, so that importing one
submodule, e.g. `memrecall.models.qwen2`, does not import the rest):

    import memrecall
    from configs import tiny                                   # from the repository root
    memrecall.train(tiny.get_config("sft"), "runs/sft")        # one stage, resumable
    run, params = memrecall.from_workdir("runs/sft")           # its config and latest weights
    rows = memrecall.evaluate_suite(params, run, model_name="lychee", lengths=[1, 8],
                                    modes=["gate", "memagent"], examples=32,
                                    output_dir="runs/sft/eval")
    run, step = memrecall.workdir_run("runs/sft/checkpoints/50")  # a step's config, no weights

The package's layers and what each module does: docs/architecture.md.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> the module that defines it.
_EXPORTS = {
    # a config -> a run (model, prompts, tokenizer, mesh, data), and loading trained weights
    "Run": "memrecall.run_builder",
    "build_run": "memrecall.run_builder",
    "default_config": "memrecall.run_builder",
    "from_workdir": "memrecall.run_builder",
    "workdir_run": "memrecall.run_builder",
    "export_hf_checkpoint": "memrecall.run_builder",
    "from_hf_checkpoint": "memrecall.run_builder",
    # training (the subpackage, callable: `memrecall.train(config, workdir)`), evaluation and a
    # trace's plot
    "train": "memrecall.train",
    "evaluate_suite": "memrecall.evaluate.evaluator",
    "evaluate_data": "memrecall.evaluate.evaluator",
    "load_trace": "memrecall.evaluate.traces",
    "plot_question": "memrecall.evaluate.traces",
    # the model's parts, as pure functions of explicit parameter trees
    "ModelConfig": "memrecall.models.config",
    "compress": "memrecall.method.compressor",
    "recall_documents": "memrecall.method.recall",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  if name not in _EXPORTS:
    raise AttributeError(f"module 'memrecall' has no attribute {name!r}")
  module = importlib.import_module(_EXPORTS[name])
  value = module if module.__name__ == f"{__name__}.{name}" else getattr(module, name)
  globals()[name] = value  # once
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_EXPORTS))
