"""Looking inside one question of an evaluation: gate scores, reads and the working memory.

Also where a reader's per-block trace becomes JSON, for evaluation's traces/*.json
(`block_columns`) and launch/answer.py's --output_json (`block_records`).

    from memrecall import run_builder
    from memrecall.evaluate import traces
    run, step = run_builder.workdir_run("runs/gate")  # its config and tokenizer, no weights
    trace = traces.load_trace("runs/gate/eval/traces/lychee-gate-8x.json", question=0)
    traces.plot_question(trace, "question0.png", decode=run.decode)
"""

from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import numpy as np

from memrecall.method.recall import RecallTrace


def block_columns(trace: RecallTrace, row: int, blocks: int) -> dict[str, list]:
  """Question `row`'s first `blocks` blocks as JSON columns: "gate_scores" (None where no gate
  ran), "read", and "memory_ids" (the working memory after each block)."""
  scores = np.asarray(trace.gate_scores[row, :blocks])
  ids, mask = np.asarray(trace.memory_ids[row]), np.asarray(trace.memory_mask[row])
  return {"gate_scores": [None if np.isnan(s) else float(s) for s in scores],
          "read": np.asarray(trace.read[row, :blocks]).tolist(),
          "memory_ids": [ids[c][mask[c]].tolist() for c in range(blocks)]}


def block_records(trace: RecallTrace, row: int, blocks: int,
                  decode: Callable[[Sequence[int]], str] | None = None) -> list[dict]:
  """The same, one record per block: {"chunk", "gate_score", "read", "memory_ids"} and, with
  `decode`, "memory" (the memory's text)."""
  columns = block_columns(trace, row, blocks)
  records = []
  for c in range(blocks):
    record = {"chunk": c, "gate_score": columns["gate_scores"][c], "read": columns["read"][c],
              "memory_ids": columns["memory_ids"][c]}
    if decode is not None:
      record["memory"] = decode(record["memory_ids"])
    records.append(record)
  return records


def load_trace(path: str, question: int = 0) -> dict:
  """One question's trace from an evaluation's traces/*.json."""
  with open(path, encoding="utf-8") as f:
    try:
      traces = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON ({e}); a truncated trace? rerun the "
                       "evaluation") from None
  if not isinstance(traces, list):
    raise ValueError(f"{path} is not an evaluation's traces file (a list of traced questions)")
  if not 0 <= question < len(traces):
    raise IndexError(f"{path} holds {len(traces)} traced questions; {question} does not exist")
  trace = traces[question]
  if not isinstance(trace, dict) or "id" not in trace:
    raise ValueError(f"{path} is not an evaluation's traces file (its entry {question} is no "
                     "traced question): give a traces/MODEL-MODE-*.json of eval.py's output "
                     "directory")
  if "gate_scores" not in trace:
    raise ValueError(f"{path} is a baseline's trace (no per-chunk gate scores): give a trace of "
                     "mode gate, all or topk")
  missing = [k for k in ("id", "read", "relevant", "memory_ids") if k not in trace]
  if missing:
    raise ValueError(f"{path} question {question} lacks {', '.join(missing)}: not an "
                     "evaluation's trace")
  return trace


def memory_changes(trace: dict) -> list[tuple[int, list[int]]]:
  """(chunk, memory ids after it) for every chunk where the memory changed."""
  changes, before = [], None
  for chunk, memory in enumerate(trace["memory_ids"]):
    if memory != before:
      changes.append((chunk, memory))
    before = memory
  return changes


def plot_question(trace: dict, path: str, decode: Callable[[Sequence[int]], str] = str,
                  title: str | None = None) -> str:
  """Gate score per chunk (bars; read chunks filled, relevant chunks marked) and the memory
  written at each change, for one question.  Returns the PNG path."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  scores = [0.0 if s is None else s for s in trace["gate_scores"]]
  read, relevant = trace["read"], trace["relevant"]
  chunks = range(len(scores))
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, len(scores) * 0.15), 5),
                                    gridspec_kw={"height_ratios": [3, 2]})
  top.bar(chunks, scores, color=["tab:blue" if r else "lightgray" for r in read])
  top.scatter([c for c in chunks if relevant[c]], [1.02] * sum(relevant), marker="v",
              color="tab:red", label="holds a needed fact")
  top.set_ylabel("gate probability")
  top.set_ylim(0, 1.08)
  top.set_xlim(-0.5, len(scores) - 0.5)
  top.legend(loc="upper right")
  top.set_title(title or f"{trace['id']}: answer {'right' if trace['correct'] else 'wrong'} "
                f"({sum(read)} of {len(read)} chunks read)")
  bottom.axis("off")
  lines = [f"after chunk {c}: {decode(m)}" for c, m in memory_changes(trace)][:12]
  bottom.text(0, 1, "working memory\n" + "\n".join(lines), va="top", family="monospace",
              fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
