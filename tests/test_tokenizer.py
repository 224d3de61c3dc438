"""Byte-level default tokenizer and HF tokenizer.json loading."""

import json
import os
import subprocess
import sys

import pytest

from memrecall.models import tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_byte_tokenizer_round_trips_unicode():
  tok = tokenizer.ByteTokenizer()
  text = "Zürich – 東京 🚀"
  ids = tok.encode(text)
  assert len(ids) == len(text.encode("utf-8")) and min(ids) >= 3
  assert tok.decode(ids) == text
  # Special and out-of-range ids are dropped when decoding.
  assert tok.decode([0, 1, 2] + ids + [400, 2]) == text
  assert tok.vocab_size == 259 and tok.eos_ids == (2,)


def test_directory_without_tokenizer_json_falls_back_to_bytes(tmp_path):
  assert isinstance(tokenizer.load_tokenizer(tmp_path), tokenizer.ByteTokenizer)
  assert isinstance(tokenizer.load_tokenizer(None), tokenizer.ByteTokenizer)


def test_hf_tokenizer_json_is_used_when_present(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {"[PAD]": 0, "[EOS]": 1, "hello": 2, "world": 3, "[UNK]": 4}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.decoder = tokenizers.decoders.WordPiece()
  tok.add_special_tokens(["[PAD]", "[EOS]"])
  tok.save(str(tmp_path / "tokenizer.json"))
  loaded = tokenizer.load_tokenizer(tmp_path, eos_ids=(1,), pad_id=0)
  assert isinstance(loaded, tokenizer.HFTokenizer)
  assert loaded.encode("hello world moon") == [2, 3, 4]
  assert loaded.decode([2, 1, 3]) == "hello world"
  assert loaded.vocab_size == 5 and loaded.eos_ids == (1,)


def test_a_checkpoints_json_is_read_as_utf8_whatever_the_locale(tmp_path):
  """tokenizer_config.json under an ASCII locale (C, with UTF-8 mode and locale coercion off):
  a non-ASCII chat template was a "not valid JSON ... copy it again" error."""
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(
      json.dumps({"chat_template": "système: {{ messages }}"}, ensure_ascii=False),
      encoding="utf-8")
  env = dict(os.environ, LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")
  script = ("import sys; from memrecall.models import tokenizer; "
            "t = tokenizer.load_tokenizer(sys.argv[1], eos_ids=(0,), pad_id=0); "
            "print(ascii(t.chat_template))")
  done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.strip() == ascii("système: {{ messages }}")
