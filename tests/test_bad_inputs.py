"""The launchers on bad inputs: one short error naming the problem, before any work.

Each case runs a launcher as `python launch/SCRIPT.py ARGS` would (in a process forked from one
that imported JAX and memrecall once: tests/forked_launchers.py) and checks the exit status (2),
that the message is at most two lines and names the problem, that no traceback and no --help
text is printed, and that no file already written (the case's own outputs, the shared
checkpoints) changed.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from tests.conftest import LYCHEE_TEXT, cpu_env
from tests import forked_launchers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = LYCHEE_TEXT
TINY = os.path.join(ROOT, "configs", "tiny.py")
ENV = cpu_env()
ENV.pop("MEMRECALL_VERBOSE", None)


def _orbax_workdir(directory: str) -> None:
  """A training workdir holding one checkpoint of random tiny parameters (no training)."""
  from memrecall.models import qwen2 as model
  from memrecall import run_builder
  from memrecall.runtime.checkpoint import Checkpointer
  from tests.train.conftest import small_config
  config = small_config("sft")
  run = run_builder.build_run(config)
  params = model.init_params(run.model, jax.random.key(0), None)
  checkpointer = Checkpointer(directory, save_every=1, keep=1, async_save=False)
  checkpointer.save(1, {"params": params, "step": np.int32(1)},
                    json.loads(config.to_json_best_effort()), {"step": 1}, force=True)
  checkpointer.close()


def _eval_key(hf: str, rows: str, memory_size: int) -> dict:
  """The key eval.py records for `--chunk_size=1024 --answer_tokens=4 --modes=all`."""
  from memrecall.evaluate import evaluator
  from memrecall.runtime import fingerprint
  from memrecall import run_builder
  run = run_builder.from_hf_checkpoint(hf, chunk_size=1024, memory_size=memory_size, answer_tokens=4)
  baseline = evaluator.BaselineConfig(memagent_chunk=1024, full_budget=512, rag_topk=4,
                                       rag_chunk=1024)
  settings = evaluator.row_settings(run.params(), run, run.recall_setup("all", threshold=0.5),
                                     baseline, task=None)
  return {**settings, "data": fingerprint.file_hash(rows)}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """Shared inputs: good and damaged checkpoints, data, a document and a trace."""
  base = tmp_path_factory.mktemp("world")
  w = {"hf": os.path.join(FIXTURE, "hf"), "rows": os.path.join(FIXTURE, "rows.json"),
       "tiny": TINY, "lychee": TINY.replace("tiny.py", "lychee.py"), "root": str(base)}
  _orbax_workdir(str(base / "run"))
  shutil.copytree(base / "run", base / "corrupt")
  for root, _, names in os.walk(base / "corrupt" / "checkpoints" / "1" / "state" / "d"):
    for name in names:
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(10)
  # A checkpoint whose saved config is torn (what analyze.py reads; not its weights).
  shutil.copytree(base / "run", base / "corrupt_config")
  with open(base / "corrupt_config" / "checkpoints" / "1" / "config" / "metadata", "r+b") as f:
    f.truncate(10)
  os.makedirs(base / "empty_run")
  for name, change in (("hf_truncated", "truncate"), ("hf_mismatched", "shape"),
                       ("hf_missing_shard", "index")):
    target = base / name
    shutil.copytree(w["hf"], target)
    for root, dirs, files in os.walk(target):
      for n in dirs + files:
        os.chmod(os.path.join(root, n), 0o755)
    if change == "truncate":
      with open(target / "model.safetensors", "r+b") as f:
        f.truncate(500_000)
    elif change == "shape":
      config = json.load(open(target / "config.json"))
      config["intermediate_size"] += 16
      json.dump(config, open(target / "config.json", "w"))
    else:
      (target / "model.safetensors.index.json").write_text(json.dumps(
          {"weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}))
  (base / "doc.txt").write_text("A short document about lychees. " * 20)
  (base / "empty.txt").write_text("")
  (base / "broken_rows.json").write_text('[{"context": "c", "input": "q", "answers": ["a"]},\n{"con')
  (base / "a_file").write_text("not a directory")
  (base / "copy").mkdir()  # a second rows.json
  shutil.copy(w["rows"], base / "copy" / "rows.json")
  trace = {"id": "q0", "gate_scores": [0.9, 0.1], "read": [1, 0], "relevant": [1, 0],
           "memory_ids": [[5], [5]], "answer_ids": [5], "gold_ids": [[5]], "correct": 1.0}
  (base / "trace.json").write_text(json.dumps([trace]))
  (base / "torn_trace.json").write_text(json.dumps([trace])[:40])
  w["key16"] = _eval_key(w["hf"], w["rows"], memory_size=16)
  return w


# --- prepared outputs of a case (already written; none may change) ----------------------------

PREDICTION = {"model": "hf", "data": "rows.json", "mode": "all", "row": 0, "prediction": "x",
              "prediction_ids": [5], "em": 0.0, "sub_em": 0.0, "strict_sub_em": 0.0}


def _rerun_with_other_settings(w, out):
  (out / "eval").mkdir()
  (out / "eval" / "keys.json").write_text(json.dumps({"hf/rows.json": w["key16"]}))
  (out / "eval" / "predictions.jsonl").write_text(json.dumps(PREDICTION) + "\n")


def _damaged_predictions(w, out):
  (out / "eval").mkdir()
  (out / "eval" / "predictions.jsonl").write_text(
      json.dumps(PREDICTION) + "\n" + '{"model": "hf", "da\n' + json.dumps(PREDICTION) + "\n")


def _bank_of_another_document(w, out):
  (out / "bank").mkdir()
  (out / "bank" / "metadata.json").write_text(json.dumps({
      "model_fingerprint": "0" * 16, "chunk_size": 1024, "window": 512, "ratio": 4,
      "dtype": "float32", "num_chunks": 1, "num_tokens": 600, "document_hash": "0123456789abcdef",
      "tokens_hash": "0" * 16, "document": "other_book.txt", "format_version": 3}))
  np.save(out / "bank" / "slot_mask.npy", np.ones((1, 256), bool))


def _shared(flags):
  return ["--hf_checkpoint={hf}", "--data=rows:{rows}", *flags]


EVAL = [
    ("missing_hf_checkpoint", ["--hf_checkpoint=/nonexistent/ckpt", "--data=rows:{rows}"],
     "/nonexistent/ckpt does not exist"),
    ("two_checkpoints", _shared(["--checkpoint={root}/run"]), "exactly one of"),
    ("hf_without_data", ["--hf_checkpoint={hf}"], "needs --data"),
    ("prompts_with_a_workdir", ["--checkpoint={root}/run", "--prompts=memagent"],
     "--prompts is for --hf_checkpoint"),
    ("split_without_data", ["--checkpoint={root}/run", "--split=train"],
     "--split picks the split of --data's"),
    ("sampling_in_the_sweep", ["--checkpoint={root}/run", "--temperature=0.7"],
     "--temperature: --data evaluation's sampling"),
    ("top_p_when_greedy", _shared(["--top_p=0.95"]), "decoding is greedy at --temperature=0"),
    ("top_p_out_of_range", _shared(["--temperature=0.7", "--top_p=1.5"]),
     "--top_p=1.5: a probability mass in (0, 1]"),
    ("sweep_flags_with_data", _shared(["--lengths=1,8", "--examples=3"]),
     "--lengths, --examples: the synthetic sweep's; --data evaluates every row"),
    ("unknown_data_kind", ["--hf_checkpoint={hf}", "--data=csv:{rows}"], "unknown kind 'csv'"),
    ("missing_data_file", ["--hf_checkpoint={hf}", "--data=rows:/nonexistent.json"],
     "/nonexistent.json does not exist"),
    ("malformed_data", ["--hf_checkpoint={hf}", "--data=rows:{root}/broken_rows.json"],
     "broken_rows.json"),
    ("zero_memory_size", _shared(["--memory_size=0"]), "--memory_size=0: 0 is not a positive"),
    ("zero_chunk_size", _shared(["--chunk_size=0"]), "--chunk_size=0"),
    ("zero_batch_size", _shared(["--batch_size=0"]), "--batch_size=0"),
    ("unknown_weight_placement", _shared(["--weights=copied"]),
     "--weights=copied: value should be one of <auto|sharded|tensor|replicated>"),
    ("negative_limit", _shared(["--limit=-1"]), "--limit=-1"),
    ("threshold_out_of_range", _shared(["--threshold=1.5"]), "--threshold=1.5"),
    ("unknown_mode", _shared(["--modes=all,fast"]), "--modes: unknown fast"),
    ("gate_mode_without_gate", _shared(["--modes=gate,all"]), "gate needs a gate"),
    ("unknown_flag", _shared(["--memory=4"]), "Unknown command line flag 'memory'"),
    ("unwritable_output", _shared(["--output_dir=/proc/memrecall_eval"]), "cannot write in /proc"),
    ("output_dir_is_a_file", _shared(["--output_dir={root}/a_file"]), "is a file"),
    ("truncated_shard", ["--hf_checkpoint={root}/hf_truncated", "--data=rows:{rows}"],
     "truncated or corrupted"),
    ("mismatched_checkpoint", ["--hf_checkpoint={root}/hf_mismatched", "--data=rows:{rows}"],
     "has shape (144, 80), expected (160, 80)"),
    ("missing_shard", ["--hf_checkpoint={root}/hf_missing_shard", "--data=rows:{rows}"],
     "names model-00002-of-00002.safetensors, which is not in"),
    ("corrupted_orbax_checkpoint", ["--checkpoint={root}/corrupt", "--lengths=1"],
     "may be truncated or corrupted"),
    ("workdir_without_checkpoints", ["--checkpoint={root}/empty_run"], "has no checkpoints/"),
    ("zero_length", ["--checkpoint={root}/run", "--lengths=0"], "--lengths must be positive"),
    ("changed_setting_on_rerun", _shared(["--chunk_size=1024", "--memory_size=4",
                                          "--answer_tokens=4", "--modes=all",
                                          "--output_dir={out}/eval"]),
     "(memory_size 16 there, 4 now)", _rerun_with_other_settings),
    ("damaged_predictions", _shared(["--modes=all", "--output_dir={out}/eval"]),
     "line 2 is not JSON", _damaged_predictions),
    ("mesh_larger_than_the_machine", ["--checkpoint={root}/run", "--lengths=1", "--mesh=fsdp=64"],
     "needs 64 devices, but 1 are available: each process runs on its own 1 device(s)"),
    ("two_data_files_of_one_name", ["--hf_checkpoint={hf}", "--data=rows:{rows},{root}/copy/rows.json"],
     "/copy/rows.json are both named rows.json"),
    ("config_with_data", ["--checkpoint={root}/run", "--config={tiny}:sft", "--data=rows:{rows}"],
     "--config is for the synthetic sweep"),
    ("config_of_other_shapes", ["--checkpoint={root}/run", "--config={tiny}:sft", "--lengths=1"],
     "do not match this model config: layers/"),
    ("malformed_mesh", _shared(["--mesh=fsdp"]), "--mesh must look like"),
]
ANSWER = [
    ("bank_of_another_document", ["--hf_checkpoint={hf}", "--document={root}/doc.txt",
                                  "--question=Which fruit?", "--memory_bank={out}/bank"],
     "was made from other_book.txt", _bank_of_another_document),
    ("missing_document", ["--hf_checkpoint={hf}", "--document=/nonexistent.txt"],
     "/nonexistent.txt does not exist"),
    # A bank replaces its whole directory: one holding anything else is refused, not emptied.
    ("bank_over_other_files", ["--hf_checkpoint={hf}", "--document={root}/doc.txt",
                               "--question=Which fruit?", "--memory_bank={root}"],
     "holds files that are not a memory bank's"),
    ("empty_document", ["--hf_checkpoint={hf}", "--document={root}/empty.txt", "--question=q"],
     "is empty"),
    ("row_out_of_range", ["--hf_checkpoint={hf}", "--document={rows}", "--row=7"],
     "row 7 does not exist"),
    ("row_of_a_text_document", ["--hf_checkpoint={hf}", "--document={root}/doc.txt", "--row=2"],
     "doc.txt is read whole"),
    ("question_twice", ["--hf_checkpoint={hf}", "--document={rows}", "--question=q",
                        "--question_ids=1,2"], "at most one of --question and --question_ids"),
    ("zero_chunk_size", ["--hf_checkpoint={hf}", "--document={rows}", "--chunk_size=0"],
     "--chunk_size=0"),
    ("gate_mode_without_gate", ["--hf_checkpoint={hf}", "--document={rows}", "--mode=gate"],
     "needs a gate"),
    ("unknown_mode", ["--hf_checkpoint={hf}", "--document={rows}", "--mode=fast"], "--mode"),
    ("bad_question_ids", ["--hf_checkpoint={hf}", "--document={rows}", "--question_ids=1,x"],
     "--question_ids must be integers"),
    ("unwritable_output", ["--hf_checkpoint={hf}", "--document={rows}",
                           "--output_json=/proc/memrecall/answer.json"], "cannot write in /proc"),
    ("url_output", ["--hf_checkpoint={hf}", "--document={rows}",
                    "--output_json=gs://bucket/answer.json"], "--output_json: path gs://bucket"),
    ("corrupted_orbax_checkpoint", ["--checkpoint={root}/corrupt", "--document={root}/doc.txt",
                                    "--question_ids=1,2"], "may be truncated or corrupted"),
    ("mesh_larger_than_the_machine", ["--hf_checkpoint={hf}", "--document={rows}",
                                      "--mesh=fsdp=2,tensor=2"], "needs 4 devices"),
]
GENERATE = [
    ("mesh_larger_than_the_machine", ["--prompt_ids=1,2", "--mesh=fsdp=64"], "needs 64 devices"),
    ("zero_mesh_axis", ["--prompt_ids=1,2", "--mesh=fsdp=0"], "axis sizes are positive"),
    ("unknown_model_size", ["--prompt_ids=1,2", "--model=huge"], "unknown model 'huge'"),
    ("zero_new_tokens", ["--prompt_ids=1,2", "--max_new_tokens=0"], "--max_new_tokens=0"),
    ("model_with_a_checkpoint", ["--prompt_ids=1,2", "--model=qwen2.5-7b",
                                 "--hf_checkpoint={hf}"], "--hf_checkpoint brings its own"),
    ("top_p_out_of_range", ["--prompt_ids=1,2", "--top_p=1.5"], "--top_p=1.5"),
    ("top_p_when_greedy", ["--prompt_ids=1,2", "--top_p=0.9"], "at temperature 0 decoding is greedy"),
    ("bad_prompt_ids", ["--prompt_ids=1,two"], "--prompt_ids must be integers"),
    ("truncated_shard", ["--hf_checkpoint={root}/hf_truncated", "--prompt_ids=1,2"],
     "truncated or corrupted"),
]
TRAIN = [
    ("unknown_config_key", ["--config={tiny}:sft", "--config.train.stepz=3",
                            "--workdir={out}/w"], "--config.train.stepz: unknown config key 'stepz'"),
    ("missing_config_file", ["--config=/nonexistent/config.py", "--workdir={out}/w"],
     "cannot load the config file ([Errno 2] No such file or directory: '/nonexistent/config.py')"
     "; the recipes are in " + os.path.join(ROOT, "configs")),
    ("unknown_stage", ["--config={tiny}:pretrain", "--workdir={out}/w"], "unknown stage 'pretrain'"),
    ("unknown_rollout_weights", ["--config={tiny}:rl", "--config.rl.rollout_weights=everywhere",
                                 "--workdir={out}/w"], "unknown rl.rollout_weights 'everywhere'"),
    ("gate_stage_with_a_frozen_gate", ["--config={tiny}:sft", "--config.stage=gate",
                                       "--workdir={out}/w"], "the gate stage trains the gate"),
    ("mesh_dcn_over_the_machine", ["--config={tiny}:sft", "--config.mesh.fsdp=1",
                                   "--config.mesh.dcn.data=2", "--workdir={out}/w"],
     "DCN [2, 1, 1] does not cover 1 devices"),
    ("recipe_with_a_fourth_field", ["--config={lychee}:rl,7b,gpu8,extra", "--workdir={out}/w"],
     "has 4 fields; expected STAGE[,SIZE[,MESH]]"),
    ("zero_steps", ["--config={tiny}:sft", "--config.train.steps=0", "--workdir={out}/w"],
     "train.steps must be a positive integer"),
    ("zero_batch_size", ["--config={tiny}:sft", "--config.train.batch_size=0", "--workdir={out}/w"],
     "train.batch_size must be a positive integer"),
    ("mesh_larger_than_the_machine", ["--config={tiny}:sft", "--config.mesh.fsdp=64",
                                      "--workdir={out}/w"], "needs 64 devices"),
    ("unwritable_workdir", ["--config={tiny}:sft", "--workdir=/proc/memrecall_run"], "/proc"),
    # Plain file I/O would write a local `gs:` directory, lost with the VM.
    ("url_workdir", ["--config={tiny}:sft", "--workdir=gs://bucket/run"],
     "workdir gs://bucket/run is a URL"),
    ("another_runs_workdir", ["--config={tiny}:sft", "--workdir={root}/run"],
     "holds another run's checkpoints (model.num_layers 2 there, 4 now"),
    ("missing_init_checkpoint", ["--config={tiny}:sft", "--config.init.checkpoint=/nonexistent",
                                 "--workdir={out}/w"], "/nonexistent has no checkpoints/"),
]
PLAN = [
    ("unknown_model_size", ["--model=huge"], "unknown model 'huge'"),
    ("zero_mesh_axis", ["--model=tiny", "--mesh=fsdp=0"], "explicit positive axis sizes"),
    ("unknown_topology", ["--model=tiny", "--mesh=pipeline=2"], "unknown axes ['pipeline']"),
    ("zero_batch", ["--model=tiny", "--batch=0"], "--batch=0"),
    ("unknown_trainable_kind", ["--model=tiny", "--trainable=most"], "--trainable=most"),
    ("unknown_config_key", ["--config={tiny}:sft", "--config.model.hiddenz=4"],
     "unknown config key 'hiddenz'"),
]
ANALYZE = [
    ("corrupted_saved_config", ["--checkpoint={root}/corrupt_config",
                                "--trace={root}/trace.json", "--output={out}/q.png"],
     "may be truncated or corrupted"),
    ("missing_trace", ["--checkpoint={root}/run", "--trace=/nonexistent.json"],
     "/nonexistent.json does not exist"),
    ("torn_trace", ["--checkpoint={root}/run", "--trace={root}/torn_trace.json",
                    "--output={out}/q.png"], "torn_trace.json is not valid JSON"),
    ("question_out_of_range", ["--checkpoint={root}/run", "--trace={root}/trace.json",
                               "--question=3", "--output={out}/q.png"],
     "holds 1 traced questions; 3 does not exist"),
    ("negative_question", ["--checkpoint={root}/run", "--trace={root}/trace.json",
                           "--question=-1"], "--question=-1"),
    ("rows_for_a_trace", ["--checkpoint={root}/run", "--trace={rows}", "--output={out}/q.png"],
     "is not an evaluation's traces file (its entry 0 is no traced question)"),
    ("unwritable_output", ["--checkpoint={root}/run", "--trace={root}/trace.json",
                           "--output=/proc/memrecall/q.png"], "cannot write in /proc"),
]
EXPORT = [
    ("missing_checkpoint", ["--checkpoint=/nonexistent_run", "--output={out}/x"],
     "/nonexistent_run does not exist"),
    ("workdir_without_checkpoints", ["--checkpoint={root}/empty_run", "--output={out}/x"],
     "has no checkpoints/"),
    ("corrupted_orbax_checkpoint", ["--checkpoint={root}/corrupt", "--output={out}/x"],
     "may be truncated or corrupted"),
    ("output_not_empty", ["--checkpoint={root}/run", "--output={root}"], "is not empty"),
    ("output_is_a_file", ["--checkpoint={root}/run", "--output={root}/a_file"],
     "a_file is a file, not a directory"),
    ("url_output", ["--checkpoint={root}/run", "--output=gs://bucket/export"], "is a URL"),
]
PREPARE_DATA = [
    ("unknown_task", ["--builder=synthetic", "--task=novel", "--data_dir={out}/tfds"],
     "unknown task 'novel'"),
    ("zero_hops", ["--builder=synthetic", "--hops=0", "--data_dir={out}/tfds"], "--hops=0"),
    ("negative_questions", ["--builder=ruler_hqa", "--num_questions=-3", "--manual_dir={root}",
                            "--data_dir={out}/tfds"], "--num_questions=-3"),
    ("manual_dir_without_hotpotqa", ["--builder=ruler_hqa", "--manual_dir={root}",
                                     "--data_dir={out}/tfds"],
     "holds no hotpot_dev_distractor_v1.json"),
    ("unwritable_data_dir", ["--builder=synthetic", "--data_dir=/proc/memrecall_tfds"],
     "cannot write in /proc"),
]
# The benchmarks, profile_decode.py, compile.py and demo.py: each refused before a model is built.
BENCH = [
    ("unknown_model", ["--model=huge"], "--model: unknown model 'huge'"),
    ("lengths_not_integers", ["--lengths=2k"], "--lengths: 2k is not a list of positive integers"),
    ("length_shorter_than_a_chunk", ["--lengths=100,2048"], "100 tokens is shorter than one chunk"),
    ("unknown_mode", ["--modes=gate,fast"], "--modes: unknown ['fast']; choose from gate, all"),
    ("zero_questions", ["--questions=0"], "--questions=0: 0 is not a positive integer"),
    ("zero_selected_fraction", ["--selected_fraction=0"], "--selected_fraction=0.0"),
    ("zero_scaling_chunks", ["--scaling_chunks=0"], "--scaling_chunks: 0 is not a list"),
    ("unwritable_output", ["--output_json=/proc/memrecall/bench.json"], "cannot write in /proc"),
]
BENCH_RECALL = [
    ("zero_chunks", ["--chunks=0"], "--chunks=0: 0 is not a positive integer"),
    ("chunk_of_odd_windows", ["--chunk_size=10"], "--chunk_size=10: window (5) must be a multiple"),
    ("unwritable_output", ["--output_json=/proc/memrecall/bench.json"], "cannot write in /proc"),
]
PROFILE_DECODE = [
    ("negative_top", ["--top=-1"], "--top=-1: -1 is not a positive integer"),
    ("stray_positional_argument", ["--model=tiny", "true"], "unexpected argument 'true'"),
]
COMPILE = [
    # Topologies, meshes and flags refused before any compile (one interpreter each had been
    # started for these in tests/test_compile.py).
    ("unknown_tpu_generation", ["--config={tiny}:sft", "--topology=v9x:2x2"],
     "unknown TPU generation"),
    ("topology_of_tensorcores", ["--config={tiny}:sft", "--topology=v5p-7"],
     "names count TensorCores"),
    ("unknown_tpu_topology", ["--config={tiny}:sft", "--topology=tpu-pod"],
     "unknown TPU topology 'tpu-pod'"),
    ("mesh_smaller_than_the_slice", ["--config={tiny}:sft", "--topology=v5p-64",
                                     "--config.mesh.fsdp=8"],
     "mesh {'data': 1, 'fsdp': 8, 'tensor': 1} has 8 devices, the slice 32"),
    ("gpu_mesh_without_a_topology", ["--config={lychee}:rl,0.5b,gpu8"],
     "names no TPU slice or GPU card"),
    ("zero_gpus_per_host", ["--config={tiny}:sft", "--topology=h100:0"],
     "GPUs per host are at least 1"),
    ("unknown_gpu_card", ["--config={tiny}:sft", "--topology=h7:8"],
     "or GPU hosts such as h100:8"),
    ("gpu_target_config_for_a_tpu", ["--config={tiny}:sft", "--topology=v5e:2x2",
                                     "--gpu_target_config=x.txtpb"],
     "--gpu_target_config is for GPU hosts; v5e:2x2 is a TPU"),
    ("unreadable_gpu_target_config", ["--config={tiny}:sft", "--topology=h100:4",
                                      "--gpu_target_config=/nonexistent"],
     "--gpu_target_config: cannot read /nonexistent"),
    ("recipe_larger_than_the_slice", ["--config={lychee}:rl,0.5b,v5p-64", "--topology=v5e:2x2"],
     "has 32 devices"),
    ("mesh_that_cannot_fill_the_slice", ["--config={tiny}:sft", "--topology=v5e:2x2",
                                         "--config.mesh.fsdp=3", "--config.mesh.data=-1"],
     "cannot fill the slice's 4 devices"),
    ("missing_config_file", ["--config={root}/nope.py:rl", "--topology=v5e:2x2"],
     "--config"),
    ("unknown_recipe_stage", ["--config={lychee}:dance,0.5b,v5p-64"],
     "unknown stage 'dance'"),
    ("unknown_eval_mode", ["--config={tiny}:sft", "--topology=v5e:2x2", "--eval_modes=gate,foo"],
     "--eval_modes: unknown ['foo']"),
    ("programs_of_another_stage", ["--config={tiny}:sft", "--topology=v5e:2x2",
                                   "--programs=rollout"],
     "--programs: ['rollout'] are not programs of this stage"),
    ("model_shapes_for_a_recipe", [f"--config={os.path.join(ROOT, 'configs', 'models.py')}:tiny"],
     "is not a training recipe (it has no stage, mesh, train); give one of configs/tiny.py"),
    ("zero_batch_size", ["--config={tiny}:sft", "--topology=v5e:2x2",
                         "--config.train.batch_size=0"],
     "train.batch_size must be a positive integer"),
    ("two_filled_mesh_axes", ["--config={tiny}:sft", "--topology=v5e:2x2",
                              "--config.mesh.fsdp=-1", "--config.mesh.data=-1"],
     "the recipe's mesh {'data': -1, 'fsdp': -1, 'tensor': 1} (--config.mesh): only one axis"),
]
DEMO = [
    ("workdir_is_a_file", ["--workdir={root}/a_file"], "a_file is a file, not a directory"),
]
CASES = [pytest.param(script, *case[:3], case[3] if len(case) > 3 else None,
                      id=f"{script[:-3]}-{case[0]}")
         for script, cases in (("eval.py", EVAL), ("answer.py", ANSWER),
                               ("generate.py", GENERATE), ("train.py", TRAIN), ("plan.py", PLAN),
                               ("analyze.py", ANALYZE), ("export.py", EXPORT),
                               ("prepare_data.py", PREPARE_DATA),
                               ("bench.py", BENCH), ("bench_recall.py", BENCH_RECALL),
                               ("profile_decode.py", PROFILE_DECODE), ("compile.py", COMPILE),
                               ("demo.py", DEMO))
         for case in cases]


def _launch(script: str, args: list[str], cwd: str) -> tuple[int, str]:
  """(exit status, stdout then stderr) of a launcher command run through the forked server."""
  proc = forked_launchers.run(script, args, ENV, cwd=cwd)
  return proc.returncode, proc.stdout + proc.stderr


def _snapshot(*directories) -> dict[str, str]:
  files = {}
  for directory in directories:
    for root, _, names in os.walk(directory):
      for name in names:
        path = os.path.join(root, name)
        files[path] = hashlib.sha256(open(path, "rb").read()).hexdigest()
  return files


@pytest.mark.parametrize("body", [
    'import sys\nprint("to stdout")\nsys.exit(2)',
    'import sys\nsys.exit("a message")',
    'import atexit, os\natexit.register(print, "at exit")\nos.write(2, b"fd 2\\n")\n'
    'print(__name__, os.path.basename(os.getcwd()))',
    'raise ValueError("unexpected")',
    # The command's environment, devices, an empty stdin (fd 0 is the server's protocol) and
    # the interpreter's import path.
    'import os, sys, jax\nprint(os.environ["MEMRECALL_PROBE"], jax.device_count(), '
    'repr(sys.stdin.read()))\nprint(sys.path)',
    # Threads joined before the exit handlers run, as the interpreter ends.
    'import atexit, threading, time\natexit.register(print, "at exit")\n'
    'threading.Thread(target=lambda: (time.sleep(0.3), print("thread", flush=True))).start()'],
    ids=["exit_2", "exit_message", "fd_2_and_exit_handler", "uncaught", "environment",
         "thread_then_exit_handler"])
def test_a_forked_command_reports_what_a_fresh_interpreter_does(tmp_path, body):
  """The status and outputs of tests/forked_launchers.py are a fresh `python script` run's (the
  traceback's frames aside: runpy's and the server's sit above the script's)."""
  script = tmp_path / "script.py"
  script.write_text(body + "\n")
  env = {**cpu_env(3), "MEMRECALL_PROBE": "probe"}
  fresh = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                         cwd=str(tmp_path), timeout=120, stdin=subprocess.DEVNULL)
  forked = forked_launchers.run(str(script), [], env, cwd=str(tmp_path))
  assert forked.returncode == fresh.returncode
  if "raise" in body:
    assert forked.stdout == "" and forked.stderr.startswith("Traceback")
    assert forked.stderr.endswith("ValueError: unexpected\n")
  else:
    assert (forked.stdout, forked.stderr) == (fresh.stdout, fresh.stderr)
  if "PROBE" in body:
    assert forked.stdout.startswith("probe 3 ''\n")
  if "thread" in body:
    assert forked.stdout == "thread\nat exit\n"


def test_a_command_whose_start_up_variables_differ_gets_its_own_server(tmp_path):
  """JAX reads JAX_* variables once, at import (Python its own, tempfile TMPDIR at first use):
  a command that sets other values runs in a server started with them, not in one that read
  the old ones; a command that leaves its platform to the launcher runs in none."""
  script = tmp_path / "script.py"
  script.write_text("import jax\nprint(jax.config.read(\"jax_disable_most_optimizations\"))\n")
  for value in ("true", "false", "true"):
    env = {**cpu_env(), "JAX_DISABLE_MOST_OPTIMIZATIONS": value}
    assert forked_launchers.run(str(script), [], env).stdout == f"{value == 'true'}\n"
  server = forked_launchers.LauncherServer(cpu_env())
  try:
    with pytest.raises(ValueError, match="JAX_DISABLE_MOST_OPTIMIZATIONS"):
      server.run(str(script), [], str(tmp_path),
                 env={**cpu_env(), "JAX_DISABLE_MOST_OPTIMIZATIONS": "false"})
    with pytest.raises(ValueError, match="TMPDIR"):
      server.run(str(script), [], str(tmp_path), env={**cpu_env(), "TMPDIR": str(tmp_path)})
  finally:
    server.close()
  (tmp_path / "tmp").mkdir()
  script.write_text("import tempfile\nprint(tempfile.gettempdir())\n")
  moved = forked_launchers.run(str(script), [], {**cpu_env(), "TMPDIR": str(tmp_path / "tmp")})
  assert moved.stdout == f"{tmp_path / 'tmp'}\n"
  unnamed = {k: v for k, v in cpu_env().items() if k != "JAX_PLATFORMS"}
  with pytest.raises(ValueError, match="JAX_PLATFORMS"):
    forked_launchers.run(str(script), [], unnamed)


def test_the_table_is_large_enough():
  assert len(CASES) >= 30 and len({c.values[0] for c in CASES}) == 13


@pytest.mark.parametrize("script,name,args,expected,prepare", CASES)
def test_bad_input(world, tmp_path, script, name, args, expected, prepare):
  del name
  out = tmp_path / "out"
  out.mkdir()
  if prepare:
    prepare(world, out)
  before = _snapshot(out, world["root"])
  command = [a.format(**world, out=out) for a in args]
  code, output = _launch(os.path.join(ROOT, "launch", script), command, str(tmp_path))
  output = output.strip()
  assert code == 2, output
  assert expected in output, output
  assert len(output.splitlines()) <= 2, output
  assert "Traceback" not in output and "\n  --" not in output and "flags:" not in output, output
  after = _snapshot(out, world["root"])
  assert {p: h for p, h in after.items() if p in before} == before, "a written file changed"


# --- library entry points: the same errors for a caller that is not a launcher ---------------

@pytest.mark.parametrize("script, shared", [
    ("train.py", ["--[no]distributed", "--coordinator_address"]),
    ("eval.py", ["--[no]distributed", "--mesh", "--matmul_precision"]),
    ("answer.py", ["--mesh"]), ("generate.py", []), ("plan.py", []), ("demo.py", [])])
def test_help_lists_the_shared_flags(tmp_path, script, shared):
  """`--help` lists a launcher's flags, the shared modules' too (README: every launcher's
  --help lists all its flags; absl shows only the main module's unless they are adopted)."""
  code, output = _launch(os.path.join(ROOT, "launch", script), ["--help"], str(tmp_path))
  assert code == 0, output  # absl's --help exits 1; asked-for help is a success
  for flag in ["--[no]verbose"] + shared:
    assert flag in output, (flag, output[-2000:])


def test_recall_documents_refuses_an_empty_document_before_compiling():
  from memrecall.method import recall
  ids = np.ones((2, 0, 4), np.int32)  # no chunk: compression would divide by zero deep in JAX
  # Refused while tracing (a static shape): no model is needed to be refused.
  with pytest.raises(ValueError, match=r"at least one chunk \(an empty document\), got shape "
                     r"\(2, 0, 4\)"):
    recall.recall_documents(None, None, None, ids, ids.astype(bool), None, None, None)


@pytest.mark.parametrize("name,damage,expected", [
    ("tokenizer.json", 10, "tokenizer.json cannot be read as a tokenizer (EOF while parsing"),
    ("tokenizer_config.json", 5, "tokenizer_config.json is not valid JSON"),
])
def test_a_truncated_tokenizer_file_is_named(tmp_path, name, damage, expected):
  from memrecall.models.tokenizer import HFTokenizer
  for file in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(FIXTURE, "hf", file), tmp_path / file)
  (tmp_path / name).write_bytes((tmp_path / name).read_bytes()[:damage])
  with pytest.raises(ValueError) as error:
    HFTokenizer(tmp_path)
  assert str(tmp_path / name) in str(error.value) and expected in str(error.value)
