"""Every stage of configs/lychee.py (and configs/memagent.py:rl) runs on a HF Qwen2 checkpoint
with its own BPE tokenizer, on data files of each layout (the real path, at toy size)."""

import json
import math
import os

import flax.traverse_util
import jax
import numpy as np
import pytest

from configs import lychee, memagent
from memrecall import run_builder
from memrecall.data import metrics
from memrecall.runtime import checkpoint
from memrecall.train import state as state_lib, trainer

STAGE_DATA = {"compressor": "text", "sft": "hotpotqa", "rl": "rows", "gate": "hotpotqa"}


def recipe(module, stage: str, hf_dir: str, data: str, workdir: str = ""):
  """A recipe at toy size: the paper's config with shapes from the checkpoint, small settings."""
  c = module.get_config(f"{stage},0.5b,auto")
  c.init.hf_checkpoint = hf_dir
  c.model.update(param_dtype="float32", dtype="float32", remat="none")
  if c.model.gate_lora_rank:
    c.model.gate_lora_rank = 4
  chunk = 64 if module is lychee else 128
  c.compressor.update(chunk_size=chunk, window=chunk, ratio=4)
  c.reasoner.update(memory_size=48, answer_tokens=12, question_tokens=48)
  c.data.update(train=data, num_docs=12, max_chunks=1 if stage == "compressor" else 16)
  c.train.update(steps=2, batch_size=2, log_every=1, checkpoint_every=1, async_checkpoint=False)
  c.optimizer.update(learning_rate=1e-2, warmup_steps=0, decay_steps=0)
  c.rl.group_size = 2
  c.mesh.update(data=1, fsdp=1, tensor=1)
  return c


def _flat(params):
  return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params).items()}


@pytest.mark.parametrize("module,stage", [(lychee, "compressor"), (lychee, "sft"), (lychee, "rl"),
                                          (lychee, "gate"), (memagent, "rl")])
def test_every_recipe_stage_trains_two_steps(module, stage, tiny_qwen, data_files, tmp_path):
  spec = f"{STAGE_DATA[stage]}:{data_files[STAGE_DATA[stage]]}"
  config = recipe(module, stage, tiny_qwen, spec)
  run = run_builder.build_run(config)
  assert run.tokenizer.vocab_size == run.model.vocab_size  # the checkpoint's own tokenizer
  assert run.model.pad_token_id == run.tokenizer.token_id("<|endoftext|>")
  before = _flat(run.params())
  trainer.train(config, str(tmp_path), log=lambda line: None)
  lines = [json.loads(x) for x in open(tmp_path / "logs" / stage / "metrics.jsonl")]
  assert [x["step"] for x in lines] == [1, 2]
  assert all(math.isfinite(x["loss"]) for x in lines), lines
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
  after = _flat(checkpoint.load_params(str(tmp_path))[0])
  trained = set(state_lib.trainable_paths(jax.tree.map(lambda x: x, run.params()),
                                          config.train.trainable))
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  assert changed and changed <= trained, (changed - trained)
  # The run carries its tokenizer and model config, readable without the HF directory.
  assert os.path.exists(tmp_path / run_builder.HF_ASSETS / "tokenizer.json")
  if module is memagent:  # its workdir evaluates with eval.py's defaults, labelled as MemAgent's
    from tests.real.test_launchers import launch
    out = tmp_path / "eval"
    launch("eval.py", f"--checkpoint={tmp_path}", f"--data=rows:{data_files['eval_rows']}",
           "--limit=1", "--answer_tokens=4", f"--output_dir={out}")
    results = json.load(open(out / "results.json"))
    assert [(r["model"], r["mode"]) for r in results] == [("memagent", "memagent")]
    # answer.py reads compressed chunks: refused before any weight is read, naming eval.py.
    proc = launch("answer.py", f"--checkpoint={tmp_path}", f"--document={data_files['rows']}",
                  check=False)
    assert proc.returncode == 2 and "evaluate it with eval.py --modes=memagent" in proc.stderr


def _byte_decoder() -> dict[str, int]:
  """The byte-level BPE alphabet (GPT-2's printable mapping of the 256 bytes), inverted."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  chars, extra = {}, 0
  for b in range(256):
    if b in printable:
      chars[chr(b)] = b
    else:
      chars[chr(256 + extra)] = b
      extra += 1
  return chars


def test_the_configs_model_settings_reach_a_run_on_a_hf_checkpoint(tiny_qwen, data_files):
  """Shapes come from the checkpoint's config.json; every other setting of the recipe's
  `model` block is the run's (remat_blocks and mlp_chunk_tokens were once dropped: a run on a
  checkpoint silently kept their defaults)."""
  config = recipe(lychee, "sft", tiny_qwen, f"hotpotqa:{data_files['hotpotqa']}")
  settings = dict(remat="dots", remat_blocks=False, mlp_chunk_tokens=123, head_chunk_tokens=45,
                  matmul_precision="highest", attention="xla", gate_lora_alpha=8.0)
  config.model.update(settings)
  model = run_builder.build_run(config).model
  assert {k: getattr(model, k) for k in settings} == settings
  shapes = json.load(open(os.path.join(tiny_qwen, "config.json")))
  assert model.hidden_size == shapes["hidden_size"] != config.model.hidden_size
  # Every setting a recipe's model block holds is a shape read from config.json or reaches
  # the run.
  read = {"vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
          "num_kv_heads", "head_dim", "rope_theta", "rms_norm_eps", "tie_word_embeddings",
          "bos_token_id", "eos_token_ids", "pad_token_id"}
  assert set(config.model.keys()) - read <= set(run_builder.MODEL_RUN_KEYS), (
      set(config.model.keys()) - read - set(run_builder.MODEL_RUN_KEYS))


def test_gate_labels_match_an_independent_scan_of_the_text(tiny_qwen, data_files):
  """Chunk c is labelled iff its bytes overlap a gold paragraph's "Document i:" block from its
  head to the end of its last supporting sentence (the block's end when only the separator
  follows, or when no fact lies inside it), found by searching the context string."""
  config = recipe(lychee, "gate", tiny_qwen, f"hotpotqa:{data_files['hotpotqa']}")
  config.train.batch_size = 4
  run = run_builder.build_run(config)
  stage = trainer._STAGES["gate"](run)
  batch, _ = stage.batch(3, None, slice(0, 4))
  hotpot = {row["_id"]: row for row in json.load(open(data_files["hotpotqa"], encoding="utf-8"))}
  vocab = {i: t for t, i in run.tokenizer._tokenizer.get_vocab().items()}
  to_byte = _byte_decoder()
  chunk = run.compressor.chunk_size
  positives = 0
  for b, ex in enumerate(run.examples(3 * 4, 4, step=3)):
    context = "".join(ex.example.segments).encode("utf-8")
    token_bytes = [bytes(to_byte[ch] for ch in vocab[int(t)]) for t in ex.context]
    assert b"".join(token_bytes) == context  # the tokens cover the text exactly
    ends = np.cumsum([len(x) for x in token_bytes])
    starts = ends - np.asarray([len(x) for x in token_bytes])
    row = hotpot[ex.example.metadata["hotpot_id"]]
    spans = []
    sentences_of = dict((t, s) for t, s in row["context"])
    for title in {t for t, _ in row["supporting_facts"]}:
      at = context.find(b":\n" + title.encode("utf-8") + b"\n")
      assert at > 0
      begin = context.rfind(b"Document ", 0, at)
      end = context.find(b"\n\nDocument ", at)
      end = len(context) if end < 0 else end + 2  # the separator ends a block
      sentences = sentences_of[title]
      last = max((k for t, k in row["supporting_facts"] if t == title and k < len(sentences)),
                 default=None)
      if last is not None:
        fact_end = at + 2 + len(title.encode("utf-8")) + 1 + len(
            "".join(sentences[:last + 1]).encode("utf-8"))
        if context[fact_end:end].strip():
          end = fact_end
      spans.append((begin, end))
    n = -(-len(ex.context) // chunk)
    want = np.zeros(batch.labels.shape[1], bool)
    for c in range(n):
      lo, hi = starts[c * chunk], ends[min((c + 1) * chunk, len(ex.context)) - 1]
      want[c] = any(lo < e and b0 < hi for b0, e in spans)
    np.testing.assert_array_equal(np.asarray(batch.labels[b]), want)
    positives += want.sum()
  assert 0 < positives


def test_rl_reward_is_strict_sub_em_of_the_decoded_answer(tiny_qwen, data_files, tmp_path):
  """Greedy rollouts twice: the second file's golds are the first pass's decoded answers (and
  "the", which compatible sub-EM would pay), so the rewards are known and not all zero."""
  def rollout(rows_path):
    config = recipe(lychee, "rl", tiny_qwen, f"rows:{rows_path}")
    config.rl.temperature = 0.0
    run = run_builder.build_run(config)
    stage = trainer._STAGES["rl"](run)
    params = run.params()
    stage.start(params)
    optimizer = state_lib.make_optimizer(state_lib.OptimizerConfig(**config.optimizer.to_dict()))
    state = state_lib.create_train_state(params, config.train.trainable, optimizer, 0)
    batch, extra = stage.batch(0, state, slice(0, 2))
    eos = set(run.model.eos_token_ids)
    answers = [[int(t) for t, keep in zip(batch.turns.answer[i], batch.turns.answer_mask[i])
                if keep and int(t) not in eos] for i in range(2)]
    return run, answers, extra
  run, answers, extra = rollout(data_files["rows"])
  rows = json.load(open(data_files["rows"]))
  first = run.examples(0, 1)[0].example  # the question this step's group asked
  row = next(r for r in rows if r["extra_info"]["question"] == first.question)
  texts = [run.tokenizer.decode(a) for a in answers]
  expected = np.mean([metrics.strict_sub_em(t, first.answers) for t in texts])
  assert extra["reward"] == pytest.approx(expected)
  assert metrics.normalize(texts[0]), texts[0]
  row["reward_model"]["ground_truth"] = [texts[0]]
  path = tmp_path / "rows.json"
  path.write_text(json.dumps([row]))
  assert rollout(str(path))[2]["reward"] == 1.0
  row["reward_model"]["ground_truth"] = ["the"]
  path.write_text(json.dumps([row]))
  assert rollout(str(path))[2]["reward"] == 0.0


def test_memagents_boxed_prompt_is_scored_on_the_box_alone(tiny_qwen, data_files):
  """MemAgent's recipe asks for the answer in \\boxed{}: its rewards and scores read the box,
  and an answer without a closed one scores 0 (MemAgent's harness), where the method's plain
  prompt scores the answer's text."""
  boxed = run_builder.build_run(recipe(memagent, "rl", tiny_qwen, f"rows:{data_files['rows']}"))
  plain = run_builder.build_run(recipe(lychee, "rl", tiny_qwen, f"rows:{data_files['rows']}"))
  assert boxed.answers_in_box and not plain.answers_in_box
  example = boxed.examples(0, 1)[0]
  gold = example.example.answers[0]
  ids = lambda text: boxed.tokenizer.encode(text)
  assert boxed.score(ids(f"It is {gold}."), example)["sub_em"] == 0.0
  assert boxed.score(ids(f"It is \\boxed{{{gold}}}."), example)["em"] == 1.0
  assert plain.score(ids(f"It is {gold}."), example)["sub_em"] == 1.0


def test_training_stream_reads_every_row_once_an_epoch_and_any_slice_alone(tiny_qwen, data_files):
  run = run_builder.build_run(recipe(lychee, "rl", tiny_qwen, f"rows:{data_files['rows']}"))
  ids = lambda start, count: [ex.example.id for ex in run.examples(start, count)]
  first, second = ids(0, 6), ids(6, 6)
  assert sorted(first) == sorted(second) == sorted(f"train_rows.json/{i}" for i in range(6))
  assert first != second  # a fresh order each epoch
  assert ids(0, 2) + ids(2, 4) == first  # what each process builds for its rows


@pytest.mark.parametrize("stage,kind,message", [
    ("sft", "rows", "the sft stage learns from supporting facts and oracle memories"),
    ("gate", "rows", "the gate stage learns from supporting facts"),
    ("rl", "text", "the rl stage needs questions"),
    ("sft", "text", "the sft stage needs questions")])
def test_a_stage_refuses_data_it_cannot_learn_from(stage, kind, message, tiny_qwen, data_files,
                                                   tmp_path):
  config = recipe(lychee, stage, tiny_qwen, f"{kind}:{data_files[kind]}")
  with pytest.raises(trainer.ConfigError, match=message):
    trainer.train(config, str(tmp_path), log=lambda line: None)
  assert os.listdir(tmp_path) == []  # refused before anything was written


def test_a_stage_started_from_an_earlier_workdir_keeps_its_backbone_tokenizer(tiny_qwen, data_files,
                                                                               tmp_path):
  # `--config.init.checkpoint=WORKDIR` alone, as configs/lychee.py tells: the HF backbone's
  # tokenizer, EOS and chat template come from the earlier stage's workdir (they were the byte
  # tokenizer's, silently, when only the weights came).
  first = recipe(lychee, "compressor", tiny_qwen, f"text:{data_files['text']}")
  first.train.steps = 1
  trainer.train(first, str(tmp_path / "compressor"), log=lambda line: None)
  config = recipe(lychee, "sft", tiny_qwen, f"hotpotqa:{data_files['hotpotqa']}")
  config.init.hf_checkpoint = ""
  config.init.checkpoint = str(tmp_path / "compressor")
  run, direct = run_builder.build_run(config), run_builder.build_run(
      recipe(lychee, "sft", tiny_qwen, f"hotpotqa:{data_files['hotpotqa']}"))
  assert type(run.tokenizer) is type(direct.tokenizer)
  assert run.tokenizer.vocab_size == direct.tokenizer.vocab_size == run.model.vocab_size
  assert run.model.eos_token_ids == direct.model.eos_token_ids
  assert run.prompts == direct.prompts
  jax.tree.map(np.testing.assert_array_equal, run.params(),
               checkpoint.load_params(str(tmp_path / "compressor"))[0])
  lines = []
  config.train.steps = 1
  trainer.train(config, str(tmp_path / "sft"), log=lines.append)
  assert f"starting from {tmp_path / 'compressor'} at step 1" in lines
  # Evaluating that workdir reads them from its own assets (its saved config names no HF
  # checkpoint; the byte tokenizer would otherwise read the rows).
  evaluated, _ = run_builder.from_workdir(str(tmp_path / "sft"))
  assert type(evaluated.tokenizer) is type(direct.tokenizer)
  assert evaluated.model.eos_token_ids == direct.model.eos_token_ids
  assert evaluated.prompts == direct.prompts


def test_a_resume_refuses_a_backbone_config_edited_in_place_and_takes_smaller_chunks(
    tiny_qwen, data_files, tmp_path):
  """The HF backbone's settings (config.json, generation_config.json) are recorded with the
  checkpoints: edited in place, the resume is refused naming them; settings that only bound
  memory (the LM head's and MLP's chunks) may change on resume."""
  import shutil
  hf = tmp_path / "hf"
  shutil.copytree(tiny_qwen, hf)
  config = recipe(lychee, "sft", str(hf), f"hotpotqa:{data_files['hotpotqa']}")
  config.train.steps = 1
  trainer.train(config, str(tmp_path / "run"), log=lambda line: None)
  saved = json.loads(config.to_json_best_effort())
  config.model.update(head_chunk_tokens=8, mlp_chunk_tokens=8)
  trainer._check_same_run(saved, json.loads(config.to_json_best_effort()), "run")  # accepted
  values = json.load(open(hf / "config.json"))
  values["rope_theta"] *= 100
  json.dump(values, open(hf / "config.json", "w"))
  config.train.steps = 2
  with pytest.raises(trainer.ConfigError, match="other model settings .*rope_theta"):
    trainer.train(config, str(tmp_path / "run"), log=lambda line: None)


def test_the_chat_template_is_read_where_transformers_saves_it(tiny_qwen, data_files, tmp_path):
  """A checkpoint's chat_template.jinja (transformers >= 4.50 saves it there) is its template:
  it wraps the prompts, keys the tokenizer and travels with a workdir's assets; a
  tokenizer_config.json listing named templates gives its `default`, or none is refused."""
  import shutil
  from memrecall.models.tokenizer import HFTokenizer
  spec = f"rows:{data_files['rows']}"
  hf = tmp_path / "hf"
  shutil.copytree(tiny_qwen, hf)
  plain = run_builder.build_run(recipe(lychee, "sft", str(hf), spec))
  template = ("{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
              "{% if add_generation_prompt %}ANSWER:{% endif %}")
  (hf / "chat_template.jinja").write_text(template)
  run = run_builder.build_run(recipe(lychee, "sft", str(hf), spec))
  wrapped = run.tokenizer.decode(run.prompts.final.pieces[0])
  assert wrapped.startswith("<<") and "<|im_start|>" not in wrapped
  assert run.tokenizer.fingerprint != plain.tokenizer.fingerprint
  run.save_assets(str(tmp_path / "work"))
  assert (tmp_path / "work" / run_builder.HF_ASSETS / "chat_template.jinja").read_text() == template
  (hf / "chat_template.jinja").unlink()
  config = json.load(open(hf / "tokenizer_config.json"))
  config["chat_template"] = [{"name": "tool_use", "template": "x"},
                             {"name": "default", "template": template}]
  json.dump(config, open(hf / "tokenizer_config.json", "w"))
  assert HFTokenizer(hf).chat_template == template
  config["chat_template"] = [{"name": "tool_use", "template": "x"}]
  json.dump(config, open(hf / "tokenizer_config.json", "w"))
  with pytest.raises(ValueError, match="none named 'default'"):
    HFTokenizer(hf)
  # A template that starts with `{{ bos_token }}` (Llama-3's) renders the config's special
  # token, an AddedToken's content included, as transformers' apply_chat_template does.
  config["chat_template"] = "{{ bos_token }}" + template
  config["bos_token"] = {"content": "<|endoftext|>", "special": True}
  json.dump(config, open(hf / "tokenizer_config.json", "w"))
  run = run_builder.build_run(recipe(lychee, "sft", str(hf), spec))
  first = run.prompts.final.pieces[0]
  assert first[0] == run.tokenizer.token_id("<|endoftext|>")
  assert run.tokenizer.decode(first[1:]).startswith("<<")


def test_a_lycheememory_checkpoints_window_is_named_before_a_chunk_that_does_not_fit_it(
    data_files):
  """On the reference's checkpoint (window 512): the MemAgent recipe builds (its 5000-token
  sections use no beacons; they were refused as not a multiple of 512), and a window set
  against the checkpoint's is named as such, not as a chunk size that does not fit it."""
  from memrecall.models.config import ConfigError
  from tests.conftest import LYCHEE_TEXT
  hf = os.path.join(LYCHEE_TEXT, "hf")
  config = memagent.get_config("rl,0.5b,auto")
  config.init.hf_checkpoint, config.data.train = hf, f"rows:{data_files['rows']}"
  run = run_builder.build_run(config)
  assert run.compressor.chunk_size == 5000 and not run.model.compressor
  toy = recipe(lychee, "sft", hf, f"hotpotqa:{data_files['hotpotqa']}")  # chunk 64, window 64
  with pytest.raises(ConfigError, match=r"compressor.window=64 differs from the checkpoint's "
                                        r"lychee_memory_window \(512\).*set compressor.window=0"):
    run_builder.build_run(toy)


def test_memagents_evaluation_prompt_is_scored_after_the_answer_is(tiny_qwen):
  """eval.py --prompts=memagent_recurrent: MemAgent's harness's final prompt, word for word as
  its `TEMPLATE_FINAL`, and its answers scored after "the answer is"."""
  from memrecall.method import prompts
  run = run_builder.from_hf_checkpoint(
      tiny_qwen, chunk_size=64, memory_size=8, answer_tokens=4,
      prompts={"final_template": prompts.MEMAGENT_RECURRENT_FINAL_TEMPLATE})
  assert run.answers_after_phrase and not run.answers_in_box
  assert not run_builder.from_hf_checkpoint(tiny_qwen, chunk_size=64).answers_after_phrase
  assert prompts.MEMAGENT_RECURRENT_FINAL_TEMPLATE.startswith(
      "You are presented with a problem and a previous memory. Please answer the problem based "
      "on the previous memory and format your response as follows \"Therefore, the answer is "
      "(insert answer here)\".\n\n<problem> \n{question}\n</problem>")
  from memrecall.data.example import Example, tokenize
  row = tokenize(Example(id="0", task="rows", segments=("Oslo is in Norway.",), supporting=(0,),
                         question="Where is Oslo?", answers=("Norway",)), run.tokenizer)
  ids = run.tokenizer.encode
  assert run.score(ids("Therefore, the answer is Norway."), row)["em"] == 1.0
  assert run.score(ids("Norway"), row)["sub_em"] == 0.0
