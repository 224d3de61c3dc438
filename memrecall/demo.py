"""The embedded default: every stage of the method on the tiny model, then evaluation.

compressor pre-training -> SFT warm start -> RL -> gate -> evaluation at 1x .. 256x the
training length in `gate`, `all` and `memagent` modes.  RL runs twice: from an
*early* SFT checkpoint, where imitation still leaves gaps, to show what the
policy gradient adds (accuracy before and after, the reward curve), and from
the final SFT model to give the pipeline's model.  Every stage writes to
WORKDIR/<stage>; a rerun reuses finished stages (each is a resumable training
run) trained with the same config, and finished evaluation rows of the same
weights and settings (`output_key`); another config or variant into the same
WORKDIR is refused, naming the stage.  The early SFT snapshot is reused only as
stages.json records it (the SFT step it was copied from), never for its directory alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import time
from typing import Callable

import ml_collections

from memrecall import run_builder
from memrecall.evaluate import evaluator, report
from memrecall.runtime import checkpoint, fingerprint, jsonl
from memrecall.runtime.distributed import is_primary
from memrecall.train import trainer


def _metrics(workdir: str, stage: str) -> list[dict]:
  return jsonl.read(os.path.join(workdir, "logs", stage, "metrics.jsonl"))


# The configs' agent (configs/tiny.py) trained beside the method as the fair baseline.
BASELINE_AGENT = "memagent"


def _greedy_accuracy(params, config: ml_collections.ConfigDict, examples: int, batch: int) -> float:
  """Greedy exact-match accuracy (%) at the training length, reading every chunk with the
  run's reader (raw chunks for the memagent agent)."""
  run = run_builder.build_run(config)
  exs = run.examples(0, examples, seed_offset=1000)
  result = evaluator.evaluate_mode(
      params, run.recall_setup("all"), run.compressor, exs, run.score,
      mode=run.reader_name("all"), baseline=_memagent_baseline(config),
      batch_size=batch, question_tokens=run.question_tokens)
  return result.accuracy


def _memagent_baseline(config: ml_collections.ConfigDict) -> evaluator.BaselineConfig:
  """MemAgent sections of the length of the chunks `config`'s run trains on: a raw reader
  evaluated on other sections reads inputs laid out unlike any it learned from."""
  return evaluator.BaselineConfig(memagent_chunk=run_builder.build_run(config).compressor.chunk_size)


def _read_stages(path: str, workdir: str) -> dict:
  """stages.json, the record of the finished stages a rerun reuses; a damaged one is named
  before any work (json's own message names no file, and a list failed only after a stage)."""
  if not os.path.exists(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      stages = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    stages, problem = None, f"is not valid JSON ({e})"
  else:
    problem = f"holds a JSON {type(stages).__name__}, not an object of stages"
  if not isinstance(stages, dict):
    raise ValueError(f"{path} {problem}: it records which stages finished; restore it, or "
                     f"delete {workdir} (or use another --workdir) to start over")
  return stages


def _write_json(path: str, value) -> None:
  """Written whole or not at all: a run killed mid-write leaves the old file, not a torn one."""
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(value, f, indent=1)
  os.replace(path + ".tmp", path)


def _config_key(config: ml_collections.ConfigDict) -> str:
  return fingerprint.value_hash(json.loads(config.to_json_best_effort()))


def _steps(directory: str) -> list[int]:
  """The checkpoint steps a stage directory holds (none: [])."""
  try:
    return checkpoint.steps(directory)
  except FileNotFoundError:
    return []


def _copy_step(source: str, step: int, target: str) -> None:
  """`source`'s checkpoint `step` as `target`'s only one; renamed into place once whole, so an
  interrupted copy leaves no `target` that a rerun would take for a finished one."""
  partial = target + ".partial"
  shutil.rmtree(partial, ignore_errors=True)
  shutil.copytree(os.path.join(source, "checkpoints", str(step)),
                  os.path.join(partial, "checkpoints", str(step)))
  os.rename(partial, target)


def _reuse_early_sft(stages: dict, key: str, early: str, sft: str) -> bool:
  """Whether the early SFT snapshot is there as stages.json records it (copied again from `sft`
  when only the copy is gone); False: it is still to be chosen.  Its directory alone proves
  nothing: made after SFT finished, it would hold the final SFT checkpoint, not the early one."""
  record = stages.get("sft_early")
  record_file = os.path.join(os.path.dirname(early), "stages.json")
  if record is None:
    if os.path.exists(early):
      raise ValueError(f"{early} has no record in {record_file} of the SFT step it holds: "
                       "delete it to choose the early SFT checkpoint again")
    return False
  if record.get("config", key) != key:  # records of older runs have no key
    raise ValueError(f"{early} was copied from an SFT run of another config (another "
                     "--variant?): use another --workdir, or delete it to start over")
  step, held = record["step"], _steps(early)
  if held == [step]:
    return True
  if os.path.exists(early):
    raise ValueError(f"{early} holds steps {held}, not step {step} of {sft} that {record_file} "
                     "records: delete it to copy that step again")
  if step not in _steps(sft):
    raise ValueError(f"{early} is gone and {sft} no longer holds step {step} it was copied from "
                     "(the early SFT checkpoint RL starts from): use another --workdir, or "
                     "delete this one to start over")
  _copy_step(sft, step, early)
  return True


def run_demo(get_config: Callable[[str], ml_collections.ConfigDict], workdir: str,
             variant: str = "default", log=print) -> dict:
  """Runs (or resumes) the whole pipeline; returns the contents of stages.json."""
  stages_path = os.path.join(workdir, "stages.json")
  stages = _read_stages(stages_path, workdir)
  os.makedirs(workdir, exist_ok=True)
  cfg = lambda stage: get_config(f"{stage},{variant}")
  demo = cfg("sft").demo

  def save_stages():
    if is_primary():
      _write_json(stages_path, stages)

  def stage(name: str, config, directory: str, extra: Callable[[], dict] | None = None):
    key = _config_key(config)
    if name in stages:
      if stages[name].get("config", key) != key:  # stages of older runs recorded no key
        raise ValueError(f"{workdir} holds the {name} stage trained with another config (another "
                         "--variant, or an earlier memrecall whose configs differ): use another "
                         "--workdir, or delete it to start over")
      log(f"[demo] {name}: done earlier ({stages[name]['wall_s']:.0f} s), reused")
      return
    log(f"[demo] {name}: {config.train.steps} steps -> {directory}")
    began = time.perf_counter()
    last = trainer.train(config, directory, log=lambda line: log(f"  {line}"))
    record = {"wall_s": time.perf_counter() - began, "steps": config.train.steps, "config": key,
              "final_metrics": {k: v for k, v in last.items() if k != "finite"}}
    if extra:
      record.update(extra())
    stages[name] = record
    save_stages()

  path = lambda name: os.path.join(workdir, name)

  compressor = cfg("compressor")
  compressor.train.steps = demo.compressor_steps
  stage("compressor", compressor, path("compressor"))

  # SFT until greedy accuracy first reaches `sft_early_accuracy` (checked at every
  # checkpoint), snapshot that step as RL's starting point where imitation still leaves
  # gaps, then on to the end (an interrupted-and-resumed run equals an uninterrupted one).
  sft = cfg("sft")
  sft.init.checkpoint = path("compressor")
  sft.train.steps = sft.optimizer.decay_steps = demo.sft_steps
  sft_key = _config_key(sft)
  if not _reuse_early_sft(stages, sft_key, path("sft_early"), path("sft")):
    probe = {}

    def reached(step: int, params) -> bool:
      accuracy = _greedy_accuracy(params, sft, demo.eval_batch, demo.eval_batch)
      log(f"  [early SFT] step {step}: greedy accuracy {accuracy:.1f}%")
      probe.update(step=step, accuracy=accuracy)
      return accuracy >= demo.sft_early_accuracy or step >= demo.sft_early_max_step

    began = time.perf_counter()
    before = _steps(path("sft"))
    trainer.train(sft, path("sft"), log=lambda line: None, stop_at=reached)
    step = max(_steps(path("sft")))
    if before and step == max(before):  # nothing trained now: the step was never probed
      raise ValueError(f"{path('sft')} has trained past the early checkpoint RL starts from "
                       f"(it holds step {step}), and no copy of that one is recorded: delete "
                       f"{path('sft')} to train SFT again, or use another --workdir")
    _copy_step(path("sft"), step, path("sft_early"))
    stages["sft_early"] = {"wall_s": time.perf_counter() - began, "step": step, "config": sft_key,
                           "accuracy_1x": probe["accuracy"] if probe.get("step") == step else None}
    save_stages()
  stage("sft", sft, path("sft"), lambda: {
      "accuracy_1x": _greedy_accuracy(checkpoint.load_params(path("sft"))[0], sft,
                                      demo.eval_examples, demo.eval_batch)})

  def rl_config(init: str):
    rl = cfg("rl")
    rl.init.checkpoint = init
    rl.train.steps = demo.rl_steps
    return rl

  def rl_summary(directory: str, init: str, config):
    def summary():
      rows = _metrics(directory, "rl")
      return {"reward_start": rows[0]["reward"] if rows else None,
              "reward_end": rows[-1]["reward"] if rows else None,
              "accuracy_before": _greedy_accuracy(checkpoint.load_params(init)[0], config,
                                                  demo.rl_eval_examples, demo.eval_batch),
              "accuracy_after": _greedy_accuracy(checkpoint.load_params(directory)[0], config,
                                                 demo.rl_eval_examples, demo.eval_batch)}
    return summary

  rl_early = rl_config(path("sft_early"))
  stage("rl_from_early_sft", rl_early, path("rl_early"),
        rl_summary(path("rl_early"), path("sft_early"), rl_early))
  rl = rl_config(path("sft"))
  stage("rl", rl, path("rl"), rl_summary(path("rl"), path("sft"), rl))

  gate = cfg("gate")
  gate.init.checkpoint = path("rl")
  gate.train.steps = demo.gate_steps
  stage("gate", gate, path("gate"))

  # The fair baseline: MemAgent's reader of raw chunks, the same stages and step budgets,
  # with its own settings (configs/tiny.py, AGENT memagent: the learning rate a raw reader
  # needs).  SFT starts from random initialisation, which is the method's backbone too (the
  # compressor stage trains only beacon parameters, which a raw reader never uses).
  if demo.train_memagent:
    memagent_cfg = lambda stage: get_config(f"{stage},{variant},multihop,{BASELINE_AGENT}")
    memagent_sft = memagent_cfg("sft")
    memagent_sft.train.steps = memagent_sft.optimizer.decay_steps = memagent_sft.demo.sft_steps
    stage("memagent_sft", memagent_sft, path("memagent_sft"), lambda: {
        "learning_rate": memagent_sft.optimizer.learning_rate,
        "accuracy_1x": _greedy_accuracy(checkpoint.load_params(path("memagent_sft"))[0],
                                        memagent_sft, demo.eval_examples, demo.eval_batch)})
    memagent_rl = memagent_cfg("rl")
    memagent_rl.init.checkpoint = path("memagent_sft")
    memagent_rl.train.steps = demo.rl_steps
    stage("memagent_rl", memagent_rl, path("memagent_rl"),
          rl_summary(path("memagent_rl"), path("memagent_sft"), memagent_rl))

  for task in demo.extra_tasks:  # SFT warm start and gate on each harder task
    task_cfg = lambda stage, task=task: get_config(f"{stage},{variant},{task}")
    task_sft = task_cfg("sft")
    task_sft.init.checkpoint = path("compressor")
    task_sft.train.steps = task_sft.optimizer.decay_steps = task_sft.demo.sft_steps
    stage(f"{task}_sft", task_sft, path(f"{task}_sft"), lambda task_sft=task_sft, task=task: {
        "accuracy_1x": _greedy_accuracy(checkpoint.load_params(path(f"{task}_sft"))[0], task_sft,
                                        demo.eval_examples, demo.eval_batch)})
    task_gate = task_cfg("gate")
    task_gate.init.checkpoint = path(f"{task}_sft")
    task_gate.train.steps = task_gate.demo.gate_steps
    stage(f"{task}_gate", task_gate, path(f"{task}_gate"))

  # Evaluation of the final model (RL + gate), the trained baseline, then the harder tasks.
  run = run_builder.build_run(cfg("sft"))
  # The baseline's reader, by its agent's name (MemAgent's raw chunks).
  baseline_reader = run_builder.AGENTS[BASELINE_AGENT]
  began = time.perf_counter()
  common = dict(lengths=list(demo.eval_lengths), batch_size=demo.eval_batch,
                output_dir=path("eval"), threshold=gate.gate.threshold, log=log,
                gate_group=demo.gate_group, latency_examples=demo.latency_examples,
                baseline=_memagent_baseline(cfg("sft")))
  rows = evaluator.evaluate_suite(
      checkpoint.load_params(path("gate"))[0], run, model_name="lychee",
      modes=list(demo.eval_modes), examples=demo.eval_examples,
      mode_examples={baseline_reader: demo.memagent_examples}, **common)
  if demo.train_memagent:
    # The same questions (the method's run and task), sections cut as the agent was trained.
    rows = evaluator.evaluate_suite(
        checkpoint.load_params(path("memagent_rl"))[0], run, model_name=BASELINE_AGENT,
        modes=[baseline_reader], examples=demo.memagent_examples,
        **{**common, "baseline": _memagent_baseline(memagent_sft)})
  for task in demo.extra_tasks:
    rows = evaluator.evaluate_suite(
        checkpoint.load_params(path(f"{task}_gate"))[0],
        run_builder.build_run(get_config(f"sft,{variant},{task}")), model_name="lychee",
        modes=[m for m in demo.eval_modes if m != baseline_reader],  # its gate's modes
        examples=demo.eval_examples, **common)
  stages.setdefault("eval", {"wall_s": time.perf_counter() - began})
  if is_primary():
    keys = ("model", "task", "mode", "length_multiple", "context_tokens", "examples", "accuracy",
            "latency_s", "batched_s", "blocks_read", "gate_recall", "skip_rate")
    with open(path("results.json"), "w", encoding="utf-8") as f:
      json.dump([{k: r[k] for k in keys} for r in rows], f, indent=1)
    save_stages()
    report.plot(rows, workdir)
    _plot_rewards(workdir, stages)
    log(report.table(rows))
    summary = _summary(stages, rows)
    for line in summary:
      log(line)
    with open(path("report.md"), "w", encoding="utf-8") as f:
      f.write(_report(variant, stages, rows, summary))
    log(f"[demo] report: {path('report.md')}")
  return stages


def _machine() -> str:
  import jax
  memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  return (f"{platform.machine()}, {os.cpu_count()} CPUs, {memory:.0f} GiB, "
          f"{jax.default_backend()} backend, jax {jax.__version__}, Python {platform.python_version()}")


def _report(variant: str, stages: dict, rows: list[dict], summary: list[str]) -> str:
  """Markdown of what the run measured: command, machine, stage times, results, summary."""
  flag = "" if variant == "default" else f" --variant={variant}"
  lines = [f"Command: `bash launch/demo.sh WORKDIR{flag}`; machine: {_machine()}; "
           f"finished {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
           "| stage | seconds | steps |", "|---|---|---|"]
  for name, record in stages.items():
    lines.append(f"| {name} | {record['wall_s']:.0f} | {record.get('steps', record.get('step', ''))} |")
  lines += [f"| total | {sum(r['wall_s'] for r in stages.values()):.0f} | |", "",
            report.markdown_table(rows), ""]
  lines += [line.removeprefix("[demo] ") + "  " for line in summary]
  return "\n".join(lines) + "\n"


def _plot_rewards(workdir: str, stages: dict) -> None:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, label in (("rl_early", "RL from early SFT"), ("rl", "RL from final SFT")):
    rows = _metrics(os.path.join(workdir, name), "rl")
    if rows:
      ax.plot([r["step"] for r in rows], [r["reward"] for r in rows], label=label)
  key = stages.get("rl_from_early_sft", {})
  if key.get("accuracy_before") is not None:
    ax.axhline(key["accuracy_before"] / 100, linestyle="--", color="gray",
               label="early SFT accuracy (greedy)")
  if key.get("accuracy_after") is not None:
    ax.axhline(key["accuracy_after"] / 100, linestyle="-.", color="C0",
               label="after RL from early SFT (greedy)")
  if stages.get("sft", {}).get("accuracy_1x") is not None:
    ax.axhline(stages["sft"]["accuracy_1x"] / 100, linestyle=":", color="black",
               label="final SFT accuracy (greedy)")
  ax.set_xlabel("RL step")
  ax.set_ylabel("reward (sampled rollouts)")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "rl_reward.png"), dpi=100)
  plt.close(fig)


def _summary(stages: dict, rows: list[dict]) -> list[str]:
  """The headline numbers, one line each: stage times, what RL added, gate vs memagent."""
  lines = []
  log = lines.append
  log("[demo] stage wall times: " + ", ".join(f"{k} {v['wall_s']:.0f}s" for k, v in stages.items())
      + f"; total {sum(v['wall_s'] for v in stages.values()):.0f}s")
  early = stages.get("rl_from_early_sft", {})
  if early:
    at = stages.get("sft_early", {}).get("step", "?")
    log(f"[demo] RL from early SFT (step {at}): greedy accuracy {early['accuracy_before']:.1f}% -> "
        f"{early['accuracy_after']:.1f}%, reward {early['reward_start']:.2f} -> "
        f"{early['reward_end']:.2f}; final SFT {stages.get('sft', {}).get('accuracy_1x', 0):.1f}%")
  by = {(r["model"], r["task"], r["mode"], r["length_multiple"]): r for r in rows}
  for task, multiple in sorted({(r["task"], r["length_multiple"]) for r in rows},
                               key=lambda x: (x[0] != "multihop", x)):
    gate = by.get(("lychee", task, "gate", multiple))
    if gate is None:
      continue
    line = (f"[demo] {'' if task == 'multihop' else task + ' '}{multiple}x: gate accuracy "
            f"{gate['accuracy']:.1f}%, recall of relevant chunks {gate['gate_recall']:.3f}, "
            f"skip rate {gate['skip_rate']:.3f}")
    ratio = lambda other, key: other[key] / gate[key]
    baseline = run_builder.AGENTS[BASELINE_AGENT]
    same = by.get(("lychee", task, baseline, multiple))
    if same:
      line += (f"; memagent mode takes {ratio(same, 'latency_s'):.1f}x gate's time per question "
               f"alone ({ratio(same, 'batched_s'):.1f}x in batches)")
    trained = by.get((BASELINE_AGENT, task, baseline, multiple))
    if trained:
      line += (f"; trained memagent {trained['accuracy']:.1f}% in "
               f"{ratio(trained, 'latency_s'):.1f}x gate's time")
    log(line)
  return lines
