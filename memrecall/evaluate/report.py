"""Evaluation results on disk: rows as JSON and CSV, and PNG plots with one line per mode."""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Sequence

ROW_KEYS = ("model", "task", "mode", "length_multiple", "context_tokens", "examples", "accuracy", "stderr",
            "latency_s", "batched_s", "peak_bytes", "blocks_read", "gate_recall", "skip_rate")


def load_rows(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    try:
      rows = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON ({e}); move it away to start over") from None
  if not isinstance(rows, list):
    raise ValueError(f"{path} does not hold a list of result rows")
  return rows


# What marks a results.json row as a synthetic sweep's (evaluate_suite) or a data file's
# (evaluate_data): the two cannot share a directory, each rewrites results.json whole.
RESULT_KINDS = {"sweep": "length_multiple", "data": "data"}


def check_results_kind(directory: str, kind: str) -> None:
  """Refuses a directory whose results.json holds the other kind's rows: writing there would
  replace them (a sweep's rows live only in that file)."""
  other = next(k for k in RESULT_KINDS if k != kind)
  path = os.path.join(directory, "results.json")
  if any(RESULT_KINDS[other] in r for r in load_rows(path)):
    described = {"sweep": "a synthetic sweep", "data": "a data evaluation"}
    raise ValueError(f"{path} holds {described[other]}'s results, which {described[kind]} "
                     "would replace: give it another output directory (--output_dir)")


def json_safe(row: dict) -> dict:
  """NaN (a figure that does not apply, e.g. gate recall of a baseline) as null: strict JSON."""
  return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}


def save_rows(rows: Sequence[dict], directory: str, name: str = "results",
              first_keys: Sequence[str] = ROW_KEYS) -> None:
  """Writes `name`.json and `name`.csv atomically (a partial file never replaces a good one)."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, f"{name}.json")
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(list(rows), f, indent=1)
  os.replace(path + ".tmp", path)
  keys = [k for k in first_keys if any(k in r for r in rows)]
  keys += sorted({k for r in rows for k in r} - set(keys))
  with open(os.path.join(directory, f"{name}.csv.tmp"), "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
  os.replace(os.path.join(directory, f"{name}.csv.tmp"), os.path.join(directory, f"{name}.csv"))


def _fmt(x, spec: str) -> str:
  """A figure that may not apply (None, NaN: e.g. no latency with --latency_examples=0) as ''."""
  return "" if x is None or x != x else format(x, spec)  # x != x: NaN


def table(rows: Sequence[dict]) -> str:
  """A fixed-width text table of the main columns."""
  header = f"{'model':<9}{'task':<10}{'mode':<10}{'length':>8}{'tokens':>9}{'acc %':>8}{'±':>6}" \
           f"{'latency s':>11}{'read':>7}"
  lines = [header, "-" * len(header)]
  for r in rows:
    lines.append(f"{r.get('model', ''):<9}{r.get('task') or '':<10}{r['mode']:<10}"
                 f"{r['length_multiple']:>7}x"
                 f"{r['context_tokens']:>9}{r['accuracy']:>8.1f}{r.get('stderr') or 0:>6.1f}"
                 f"{_fmt(r.get('latency_s'), '.4f'):>11}"
                 f"{_fmt(r.get('blocks_read'), '.1f') or '-':>7}")
  return "\n".join(lines)


def markdown_table(rows: Sequence[dict]) -> str:
  """The results as a Markdown table (docs/results.md shows the demo's)."""
  lines = ["| model | task | mode | length | tokens | questions | accuracy % | ± | latency s | "
           "s / question in batches | blocks read | gate recall | skip rate |", "|" + "---|" * 13]
  fmt = _fmt
  for r in rows:
    lines.append(f"| {r.get('model', '')} | {r.get('task') or ''} | {r['mode']} | "
                 f"{r['length_multiple']}x | "
                 f"{r['context_tokens']} | {r['examples']} | {r['accuracy']:.1f} | "
                 f"{fmt(r.get('stderr'), '.1f')} | {fmt(r.get('latency_s'), '.4f')} | "
                 f"{fmt(r.get('batched_s'), '.4f')} | "
                 f"{fmt(r.get('blocks_read'), '.1f') or '-'} | {fmt(r.get('gate_recall'), '.3f')} | "
                 f"{fmt(r.get('skip_rate'), '.3f')} |")
  return "\n".join(lines)


def plot(rows: Sequence[dict], directory: str, prefix: str = "") -> dict[str, list[str]]:
  """accuracy / latency / peak memory vs context length, one line per (model, mode).

  Returns {png path: labels of the lines drawn in it}.
  """
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is not installed: no plots (pip install 'memrecall[plot]')")
    return {}
  written = {}
  series = sorted({(r.get("model", ""), r.get("task") or "", r["mode"]) for r in rows})
  tasks = {task for _, task, _ in series}
  for key, axis_label, log_y in (("accuracy", "accuracy (%)", False),
                                 ("latency_s", "seconds per question (alone)", True),
                                 ("peak_bytes", "peak bytes", True)):
    if not any(r.get(key) is not None for r in rows):
      continue
    fig, ax = plt.subplots(figsize=(6, 4))
    for model, task, mode in series:
      points = sorted((r["context_tokens"], r[key]) for r in rows
                      if (r.get("model", ""), r.get("task") or "", r["mode"]) == (model, task, mode)
                      and r.get(key) is not None)
      if points:
        line = f"{model} {mode}" + (f" ({task})" if len(tasks) > 1 else "")
        ax.plot(*zip(*points), marker="o", label=line.strip())
    ax.set_xscale("log")
    if log_y:
      ax.set_yscale("log")
    ax.set_xlabel("context tokens")
    ax.set_ylabel(axis_label)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    path = os.path.join(directory, f"{prefix}{key.replace('_s', '').replace('_bytes', '')}_vs_length.png")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    written[path] = [line.get_label() for line in ax.get_lines()]
    plt.close(fig)
  return written


# --- results of data files (evaluation.evaluate_data) ------------------------------

DATA_ROW_KEYS = ("model", "data", "num_docs", "mode", "examples", "context_tokens", "sub_em",
                 "sub_em_stderr", "strict_sub_em", "strict_sub_em_stderr", "em", "em_stderr",
                 "blocks_read", "truncated", "truncated_fraction")


def data_table(rows: Sequence[dict]) -> str:
  """Fixed-width text: one line per (model, data file, documents, mode); `cut off` counts the
  answers scored as they stood at answer_tokens."""
  header = (f"{'model':<12}{'data':<22}{'docs':>6}{'mode':>10}{'rows':>6}{'tokens':>10}"
            f"{'sub-EM':>8}{'strict':>8}{'EM':>7}{'read':>7}{'cut off':>9}")
  lines = [header, "-" * len(header)]
  for r in rows:
    lines.append(f"{r['model'][:11]:<12}{_tail(r['data'], 21):<22}{r.get('num_docs') or '':>6}"
                 f"{r['mode']:>10}{r['examples']:>6}{r['context_tokens']:>10.0f}"
                 f"{r['sub_em']:>8.1f}{r['strict_sub_em']:>8.1f}{r['em']:>7.1f}"
                 f"{_fmt(r['blocks_read'], '.1f') or '-':>7}{_cut_off(r):>9}")
  return "\n".join(lines)


def _tail(text: str, width: int) -> str:
  """The end of a long name (a dataset's config and version tell datasets apart, not its
  builder's name)."""
  return text if len(text) <= width else "…" + text[-(width - 1):]


def _cut_off(row: dict) -> str:
  """Answers that reached answer_tokens without an EOS ('?': rows from before the record)."""
  return "?" if row.get("truncated") is None else str(row["truncated"])


def save_data_rows(rows: Sequence[dict], directory: str) -> None:
  """results.json / results.csv, and sub-EM vs context length (one line per model and mode)."""
  save_rows([json_safe(r) for r in rows], directory, first_keys=DATA_ROW_KEYS)
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return
  fig, ax = plt.subplots(figsize=(6, 4))
  for model, mode in sorted({(r["model"], r["mode"]) for r in rows}):
    points = sorted((r["context_tokens"], r["sub_em"]) for r in rows
                    if (r["model"], r["mode"]) == (model, mode))
    ax.plot(*zip(*points), marker="o", label=f"{model} {mode}")
  ax.set_xscale("log")
  ax.set_xlabel("context tokens")
  ax.set_ylabel("sub-EM (%)")
  ax.legend(fontsize="small")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(directory, "sub_em_vs_length.png"), dpi=100)
  plt.close(fig)
