"""A tiny random Qwen2 HF checkpoint with a BPE tokenizer trained here, and data in every layout.

The tokenizer is a byte-level BPE trained by `tokenizers`' own trainer on the HotpotQA-format
fixture text; the chat template is Qwen2.5's ChatML; config.json names `<|im_end|>` as EOS and
no pad id (the pad then comes from tokenizer_config.json's `<|endoftext|>`), as Qwen2.5's does.
"""

import json
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
ROOT = os.path.dirname(TESTS)
HOTPOT_DEV = os.path.join(TESTS, "data", "fixtures", "hotpot_dev_tiny.json")
MEMAGENT_EVAL = os.path.join(TESTS, "data", "fixtures", "memagent_eval_20.json")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus_lines() -> list[str]:
  """Every paragraph, question and answer of the HotpotQA fixture, one per line."""
  rows = json.load(open(HOTPOT_DEV, encoding="utf-8"))
  lines = []
  for row in rows:
    lines += [row["question"], row["answer"]]
    lines += [title + "\n" + "".join(sentences) for title, sentences in row["context"]]
  return lines


def make_tiny_qwen(directory: str, vocab_size: int = 384) -> str:
  """Writes the checkpoint (random weights, seed 0) and returns its directory."""
  import jax
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from memrecall.models import hf_checkpoint, qwen2 as model_lib
  from memrecall.models.config import ModelConfig
  from memrecall.method.prompts import QWEN2_CHAT_TEMPLATE

  os.makedirs(directory, exist_ok=True)
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(corpus_lines(), trainer)
  tok.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"chat_template": QWEN2_CHAT_TEMPLATE, "eos_token": "<|im_end|>",
               "pad_token": "<|endoftext|>"}, f)
  config = ModelConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                       num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, rope_theta=10000.0,
                       eos_token_ids=(tok.token_to_id("<|im_end|>"),))
  params = model_lib.init_params(config, jax.random.key(0))
  hf_checkpoint.save_hf_checkpoint(params, config, directory)
  # As Qwen2.5's config.json: an EOS, no pad id.
  path = os.path.join(directory, "config.json")
  values = json.load(open(path))
  values["pad_token_id"] = None
  json.dump(values, open(path, "w"), indent=1)
  return directory


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> str:
  return make_tiny_qwen(str(tmp_path_factory.mktemp("tiny_qwen")))


@pytest.fixture(scope="session")
def data_files(tmp_path_factory) -> dict[str, str]:
  """One small file per data layout."""
  directory = tmp_path_factory.mktemp("data")
  rows = json.load(open(HOTPOT_DEV, encoding="utf-8"))
  text = directory / "corpus.txt"
  text.write_text("\n\n".join(corpus_lines()), encoding="utf-8")
  # MemAgent's RL-data layout (as LycheeMemory's test.json), short contexts of a few paragraphs.
  rl_rows = []
  for i, row in enumerate(rows[:6]):
    context = "\n\n".join(f"Document {j + 1}:\n{t}\n{''.join(s)}"
                          for j, (t, s) in enumerate(row["context"][:4]))
    rl_rows.append({"data_source": "hotpotqa", "context": context,
                    "prompt": [{"role": "user", "content": row["question"]}],
                    "reward_model": {"style": "rule", "ground_truth": [row["answer"]]},
                    "extra_info": {"index": i, "question": row["question"], "num_docs": 4}})
  rl = directory / "train_rows.json"
  rl.write_text(json.dumps(rl_rows), encoding="utf-8")
  # Its evaluation layout, as JSONL.
  ev = directory / "eval_rows.jsonl"
  ev.write_text("".join(json.dumps({"context": r["context"], "input": r["extra_info"]["question"],
                                    "answers": r["reward_model"]["ground_truth"], "num_docs": 4,
                                    "index": r["extra_info"]["index"]}) + "\n" for r in rl_rows),
                encoding="utf-8")
  return {"text": str(text), "rows": str(rl), "eval_rows": str(ev), "hotpotqa": HOTPOT_DEV,
          "ruler_hqa": MEMAGENT_EVAL}
