"""Data specs (`KIND:PATH[,PATH...]`): every kind on tiny files, and errors naming file and row."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from memrecall.data import ruler_hqa, specs
from memrecall.data.ruler_hqa import DatasetError
from memrecall.data.sources import ListSource, SyntheticSource, split_seed, synthetic_splits
from memrecall.data.synthetic import TaskConfig
from memrecall.models.tokenizer import ByteTokenizer
from tests.conftest import LYCHEE_TEXT

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")
DEV = os.path.join(FIXTURES, "hotpot_dev_tiny.json")
EVAL = os.path.join(FIXTURES, "memagent_eval_20.json")
EVAL_INDICES = os.path.join(FIXTURES, "memagent_eval_idx_20.json")
LYCHEE_ROWS = os.path.join(LYCHEE_TEXT, "rows.json")
POOL_SIZE = 139

RL_ROW = {"data_source": "fixture", "context": "Ada was born in Oslo.",
          "prompt": [{"role": "system", "content": "Answer briefly."},
                     {"role": "user", "content": "Where was Ada born?"}],
          "reward_model": {"ground_truth": ["Oslo"], "style": "rule"},
          "extra_info": {"question": "Where was Ada born?", "num_docs": 1, "index": 7}}
EVAL_ROW = {"context": "Bo likes tea.", "input": "What does Bo like?", "answers": ["tea", "Tea"],
            "num_docs": 3, "index": 4}
CHAT_ROW = {"context": "Cy is 9.", "prompt": [{"role": "user", "content": "How old is Cy?"}],
            "outputs": ["9"]}


def _write_json(path, rows):
  path.write_text(json.dumps(rows), encoding="utf-8")
  return str(path)


def _write_jsonl(path, rows, blank_after=()):
  path.write_text("".join(json.dumps(r) + "\n" + ("\n" if i in blank_after else "")
                          for i, r in enumerate(rows)), encoding="utf-8")
  return str(path)


def _one(spec, **options):
  (named,) = specs.open_sources(spec, specs.DataOptions(**options))
  return named


def _content(example):
  """An example's fields, metadata included, without the file-derived id and source."""
  metadata = {k: v for k, v in example.metadata.items() if k != "source"}
  return (example.segments, example.question, example.answers, example.supporting, metadata)


# --- specs --------------------------------------------------------------------


def test_parse_spec():
  assert specs.parse_spec("rows:/d/a.json,/d/b.jsonl") == specs.DataSpec(
      "rows", ("/d/a.json", "/d/b.jsonl"))
  assert specs.parse_spec("synthetic:multihop") == specs.DataSpec("synthetic", ("multihop",))
  assert specs.parse_spec("text: /d/a.txt , /d/b.txt") == specs.DataSpec(
      "text", ("/d/a.txt", "/d/b.txt"))
  assert str(specs.parse_spec("tfds:/x/1.0.0")) == "tfds:/x/1.0.0"


@pytest.mark.parametrize("spec, match", [
    ("parquet:/d/a.parquet", "'parquet:/d/a.parquet': unknown kind 'parquet'; choose from rows, "
                             "hotpotqa, ruler_hqa, text, synthetic, tfds"),
    ("/d/a.json", "'/d/a.json': expected KIND:PATH"),
    ("rows:", "'rows:': no path"),
    ("rows: ", "no path"),
    ("rows:/a.json,,/b.json", "'rows:/a.json,,/b.json': an empty path"),
])
def test_bad_specs_are_named(spec, match):
  with pytest.raises(DatasetError, match=re.escape(match)):
    specs.parse_spec(spec)
  with pytest.raises(DatasetError, match=re.escape(match)):
    specs.open_sources(spec)


def test_missing_files_are_named(tmp_path):
  good = _write_json(tmp_path / "good.json", [EVAL_ROW])
  for kind in ("rows", "hotpotqa", "ruler_hqa", "text", "tfds"):
    missing = str(tmp_path / f"nope-{kind}.json")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
      specs.open_sources(f"{kind}:{good},{missing}", tokenizer=ByteTokenizer())
  with pytest.raises(FileNotFoundError, match="nope.json"):
    specs.open_sources("ruler_hqa:" + EVAL, specs.DataOptions(hotpotqa_dev=str(tmp_path / "nope.json")))


def test_concat_source():
  a = ListSource(specs.open_sources("ruler_hqa:" + EVAL)[0].source)
  b = ListSource([])
  c = ListSource(list(a)[:2])
  both = specs.ConcatSource([a, b, c])
  assert len(both) == 5
  assert [e.id for e in both] == [e.id for e in a] + [e.id for e in c]
  assert both[3] == c[0] and both[-1] == c[1] and both[-5] == a[0]
  with pytest.raises(IndexError, match="out of range"):
    both[5]
  assert len(specs.ConcatSource([])) == 0


# --- rows ---------------------------------------------------------------------


def test_lychee_rows_in_the_rl_layout():
  assert os.path.exists(LYCHEE_ROWS), f"missing {LYCHEE_ROWS} (../shared/fixtures beside the checkout)"
  named = _one("rows:" + LYCHEE_ROWS)
  assert (named.name, named.path) == ("rows.json", LYCHEE_ROWS)
  first, second = named.source
  assert [first.id, second.id] == ["rows.json/0", "rows.json/1"]
  assert (first.question, first.answers) == ("Which baseline reads raw chunks?", ("MemAgent",))
  assert (second.question, second.answers) == ("How many KV heads does the 7B backbone have?",
                                               ("4", "four"))
  assert first.task == "rows" and first.supporting == () and len(first.segments) == 1
  assert first.context.startswith("# memrecall")
  assert first.metadata == {"row": 0, "num_docs": 1, "index": 0, "source": "rows.json"}


def test_rows_json_and_jsonl_agree(tmp_path):
  rows = [RL_ROW, EVAL_ROW, CHAT_ROW]
  as_json = _write_json(tmp_path / "a.json", rows)
  as_jsonl = _write_jsonl(tmp_path / "b.jsonl", rows, blank_after=(0,))
  a, b = specs.open_sources(f"rows:{as_json},{as_jsonl}")
  assert (a.name, b.name) == ("a.json", "b.jsonl")
  assert [_content(e) for e in a.source] == [_content(e) for e in b.source]
  assert [e.id for e in b.source] == ["b.jsonl/0", "b.jsonl/1", "b.jsonl/2"]
  rl, evaluation, chat = a.source
  assert (rl.question, rl.answers) == ("Where was Ada born?", ("Oslo",))
  assert rl.metadata == {"row": 0, "num_docs": 1, "index": 7, "source": "a.json"}
  assert (evaluation.question, evaluation.answers) == ("What does Bo like?", ("tea", "Tea"))
  assert evaluation.metadata == {"row": 1, "num_docs": 3, "index": 4, "source": "a.json"}
  assert (chat.question, chat.answers, chat.metadata) == (
      "How old is Cy?", ("9",), {"row": 2, "source": "a.json"})
  # One object is one row; training reads a spec's files as one source.
  single = _write_json(tmp_path / "one.json", EVAL_ROW)
  assert len(_one("rows:" + single).source) == 1
  whole = specs.ConcatSource([n.source for n in specs.open_sources(f"rows:{as_json},{single}")])
  assert [e.id for e in whole] == ["a.json/0", "a.json/1", "a.json/2", "one.json/0"]


def test_rows_parquet(tmp_path):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  rows = [RL_ROW, EVAL_ROW, CHAT_ROW]
  keys = list(dict.fromkeys(k for r in rows for k in r))  # one schema: absent fields are nulls
  path = str(tmp_path / "rows.parquet")
  pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), path)
  from_parquet = _one("rows:" + path)
  from_json = _one("rows:" + _write_json(tmp_path / "rows.json", rows))
  assert [_content(e) for e in from_parquet.source] == [_content(e) for e in from_json.source]
  assert from_parquet.source[0].id == "rows.parquet/0"


def test_parquet_without_pyarrow_names_the_install(tmp_path, monkeypatch):
  path = tmp_path / "rows.parquet"
  path.write_bytes(b"PAR1")
  monkeypatch.setitem(sys.modules, "pyarrow", None)
  monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
  with pytest.raises(ImportError, match="rows.parquet needs pyarrow: pip install pyarrow"):
    specs.open_sources(f"rows:{path}")


@pytest.mark.parametrize("row, match", [
    ({"context": "c", "input": "q"}, "missing answers \\(one of reward_model.ground_truth, answers"),
    ({"context": "c", "input": "q", "reward_model": {"style": "rule"}}, "missing answers"),
    ({"context": "c", "input": "q", "answers": []}, "field 'answers' should be"),
    ({"context": "c", "input": "q", "answers": [3]}, "field 'answers' should be"),
    ({"context": "c", "input": "q", "reward_model": {"ground_truth": [""]}},
     "field 'reward_model.ground_truth' should be"),
    ({"context": "c", "answers": ["a"], "prompt": [{"role": "system", "content": "hi"}]},
     "missing question \\(looked for a non-empty string in extra_info.question, input, question, "
     "query and the last user message of prompt\\)"),
    ({"context": " \n", "input": "q", "answers": ["a"]}, "empty context"),
    ({"input": "q", "answers": ["a"]}, "missing field 'context'"),
    ([1, 2], "expected an object, got list"),
])
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_bad_rows_name_file_and_row(tmp_path, row, match, suffix):
  rows = [EVAL_ROW, RL_ROW, row]
  if suffix == ".json":
    path, where = _write_json(tmp_path / "bad.json", rows), "row 2"
  else:
    path, where = _write_jsonl(tmp_path / "bad.jsonl", rows, blank_after=(0,)), "row 2 \\(line 4\\)"
  with pytest.raises(DatasetError, match=rf"{re.escape(path)} {where}: {match}"):
    specs.open_sources("rows:" + path)


def test_bad_row_files_are_named(tmp_path):
  broken = tmp_path / "broken.jsonl"
  broken.write_text(json.dumps(EVAL_ROW) + "\n\n{\"context\": \n")
  with pytest.raises(DatasetError, match=rf"{re.escape(str(broken))}: invalid JSON at line 3"):
    specs.open_sources(f"rows:{broken}")
  for name, text in (("empty.json", ""), ("blank.jsonl", "\n \n")):
    (tmp_path / name).write_text(text)
    with pytest.raises(DatasetError, match=rf"{re.escape(str(tmp_path / name))} (is empty|holds no rows)"):
      specs.open_sources(f"rows:{tmp_path / name}")
  (tmp_path / "none.json").write_text("[]")
  with pytest.raises(DatasetError, match="none.json holds no rows"):
    specs.open_sources(f"rows:{tmp_path / 'none.json'}")


# --- hotpotqa -------------------------------------------------------------------


def _blocks(context):
  """Document texts of a context, parsed independently of the module."""
  parts = re.split(r"(?:^|\n\n)Document (\d+):\n", context)
  assert parts[0] == ""
  assert parts[1::2] == [str(i + 1) for i in range(len(parts) // 2)]
  return parts[2::2]


def test_hotpotqa_examples_are_built_on_access(monkeypatch):
  calls = []
  real = ruler_hqa.HotpotPool.example

  def counted(self, q, *args, **kwargs):
    calls.append(q)
    return real(self, q, *args, **kwargs)
  monkeypatch.setattr(ruler_hqa.HotpotPool, "example", counted)
  named = _one("hotpotqa:" + DEV, num_docs=20, seed=3)
  assert named.name == "hotpot_dev_tiny.json" and len(named.source) == 14 and calls == []
  named.source[5]
  named.source[-1]
  assert calls == [5, 13]


def test_hotpotqa_matches_build_ruler_hqa():
  rows = ruler_hqa.load_hotpotqa(DEV)
  source = _one("hotpotqa:" + DEV, num_docs=20, seed=3).source
  again = _one("hotpotqa:" + DEV, num_docs=20, seed=3).source
  other_seed = _one("hotpotqa:" + DEV, num_docs=20, seed=4).source
  built = ruler_hqa.build_ruler_hqa(rows, num_docs=20, num_questions=14, seed=3)
  for i in (9, 0, 13, 4):  # any order: example i depends on (seed, i) only
    example = source[i]
    # The same construction; only the task (and the file named in metadata) differ.
    assert example == dataclasses.replace(built[i], task="hotpotqa")
    assert example.oracle_memory == built[i].oracle_memory
    assert example.metadata == {**built[i].metadata, "source": "hotpot_dev_tiny.json"}
    assert again[i] == example
  assert sum(other_seed[i].segments != source[i].segments for i in range(14)) >= 13


@pytest.mark.parametrize("num_docs", [10, 20, POOL_SIZE])
def test_hotpotqa_supporting_blocks_and_num_docs(num_docs):
  rows = ruler_hqa.load_hotpotqa(DEV)
  source = _one("hotpotqa:" + DEV, num_docs=num_docs).source
  for i, example in enumerate(source):
    row = rows[i]
    texts = _blocks(example.context)
    assert len(texts) == num_docs
    assert example.metadata["num_docs"] == num_docs and example.id == f"{row.id}/{num_docs}"
    assert (example.question, example.answers) == (row.question, (row.answer,))
    own = [title + "\n" + "".join(sentences) for title, sentences in row.context]
    assert all(texts.count(p) == 1 for p in own)
    titles = {t for t, _ in row.supporting_facts}
    # An independent scan of the context string: the blocks whose title line is a gold title
    # hold the supporting segments (cut at their facts: tests/data/test_ruler_hqa.py).
    ends = np.cumsum([len(s) for s in example.segments])
    held = {example.context.count("Document ", 0, ends[j] - 1) - 1 for j in example.supporting}
    assert held == {b for b, t in enumerate(texts) if t.split("\n", 1)[0] in titles}
    paragraphs = dict(row.context)
    for title, k in row.supporting_facts:
      if k < len(paragraphs[title]):
        assert any(paragraphs[title][k] in example.segments[b] for b in example.supporting)
        assert f"{title}: {paragraphs[title][k].strip()}" in example.oracle_memory[-1]


def test_hotpotqa_num_docs_out_of_range():
  with pytest.raises(DatasetError, match=rf"num_docs=140 .*{re.escape(DEV)} has 139"):
    specs.open_sources("hotpotqa:" + DEV, specs.DataOptions(num_docs=140))
  with pytest.raises(DatasetError, match="num_docs=200"):  # the default
    specs.open_sources("hotpotqa:" + DEV)
  with pytest.raises(DatasetError, match=r"num_docs=9 must lie in \[10, 139\].*\(data.num_docs, "
                                         r"or eval.py's --num_docs\)"):
    specs.open_sources("hotpotqa:" + DEV, specs.DataOptions(num_docs=9))


# --- ruler_hqa ------------------------------------------------------------------


def test_ruler_hqa_eval_files():
  text, indices = specs.open_sources(f"ruler_hqa:{EVAL},{EVAL_INDICES}",
                                     specs.DataOptions(hotpotqa_dev=DEV))
  assert (text.name, indices.name) == ("memagent_eval_20.json", "memagent_eval_idx_20.json")
  assert [e.metadata["index"] for e in text.source] == [3, 9, 5]
  assert all(e.metadata["num_docs"] == 20 and len(_blocks(e.context)) == 20 and e.supporting
             for e in text.source)
  assert [(e.segments, e.supporting) for e in indices.source] == \
         [(e.segments, e.supporting) for e in text.source]
  # Labelled rows are keyed by how they are built (segments, labels), unlabelled by the file.
  assert text.options["layout"] == ruler_hqa.LAYOUT == _one("hotpotqa:" + DEV, num_docs=20).options["layout"]
  assert "layout" not in _one("ruler_hqa:" + EVAL).options
  unlabelled = _one("ruler_hqa:" + EVAL).source
  assert [e.supporting for e in unlabelled] == [(), (), ()]
  assert [e.question for e in unlabelled] == [e.question for e in text.source]
  with pytest.raises(DatasetError, match=r"memagent_eval_idx_20.json row 0: .*pool indices"):
    specs.open_sources("ruler_hqa:" + EVAL_INDICES)


# --- text -----------------------------------------------------------------------


def test_text_file_cut_into_windows(tmp_path):
  tok = ByteTokenizer()
  path = tmp_path / "corpus.txt"
  path.write_text("abcdefghij", encoding="utf-8")
  ids = tok.encode("abcdefghij")
  source = specs.open_sources(f"text:{path}", specs.DataOptions(text_tokens=4), tokenizer=tok)[0].source
  assert len(source) == 3
  assert [e.segments for e in source] == [(tuple(ids[0:4]),), (tuple(ids[4:8]),), (tuple(ids[8:]),)]
  last = source[-1]
  assert last.is_tokenized and last.question == () and last.answers == ((),) and last.task == "text"
  assert last.id == "corpus.txt/2" and last.metadata == {"source": "corpus.txt", "offset": 8}
  exact = specs.open_sources(f"text:{path}", specs.DataOptions(text_tokens=5), tokenizer=tok)[0]
  assert [len(e.segments[0]) for e in exact.source] == [5, 5]


def test_text_jsonl_documents_joined_by_eos(tmp_path):
  tok = ByteTokenizer()
  path = _write_jsonl(tmp_path / "docs.jsonl", [{"text": "ab"}, {"text": ""}, {"text": "cde"},
                                                {"text": "f", "meta": 1}], blank_after=(1,))
  source = specs.open_sources(f"text:{path}", specs.DataOptions(text_tokens=4), tokenizer=tok)[0].source
  eos = tok.eos_ids[0]
  a, b, c, d, e, f = tok.encode("abcdef")
  assert [e_.segments[0] for e_ in source] == [(a, b, eos, c), (d, e, eos, f)]
  assert [x.metadata["offset"] for x in source] == [0, 4]
  upper = tmp_path / "DOCS.JSONL"  # JSON lines in any case, not one document of raw JSON
  upper.write_bytes(open(path, "rb").read())
  (same,) = specs.open_sources(f"text:{upper}", specs.DataOptions(text_tokens=4), tokenizer=tok)
  assert [e_.segments[0] for e_ in same.source] == [(a, b, eos, c), (d, e, eos, f)]

  class NoEos:
    def encode(self, text):
      return [ord(ch) for ch in text]
  (plain,) = specs.open_sources(f"text:{path}", specs.DataOptions(text_tokens=100), NoEos())
  assert plain.source[0].segments == (tuple(map(ord, "abcdef")),)


def test_text_errors(tmp_path):
  tok = ByteTokenizer()
  path = _write_jsonl(tmp_path / "docs.jsonl", [{"text": "ab"}, {"body": "x"}], blank_after=(0,))
  with pytest.raises(DatasetError, match=rf"{re.escape(path)} row 1 \(line 3\): .*string field 'text'"):
    specs.open_sources(f"text:{path}", tokenizer=tok)
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  with pytest.raises(DatasetError, match=rf"{re.escape(str(empty))}: the corpus has no tokens"):
    specs.open_sources(f"text:{empty}", tokenizer=tok)
  rows = tmp_path / "rows.json"  # trained on as its raw JSON, before
  rows.write_text('[{"text": "ab"}]')
  with pytest.raises(DatasetError, match=r"rows.json: text: data is plain text, or .jsonl"):
    specs.open_sources(f"text:{rows}", tokenizer=tok)
  blank = _write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}])
  with pytest.raises(DatasetError, match="blank.jsonl: the corpus has no tokens"):
    specs.open_sources(f"text:{blank}", tokenizer=tok)
  with pytest.raises(DatasetError, match="needs a tokenizer"):
    specs.open_sources(f"text:{empty}")


# --- synthetic ------------------------------------------------------------------


def test_synthetic():
  task = TaskConfig(task="multihop", form="ids", length=96, hops=2)
  named = _one("synthetic:multihop", task=task, size=5, seed=2, split="validation")
  assert (named.name, named.path, len(named.source)) == ("multihop", "multihop", 5)
  expected = SyntheticSource(task, split_seed(2, "validation"), 5)
  assert [e.to_json() for e in named.source] == [e.to_json() for e in expected]
  with pytest.raises(DatasetError,
                     match="names task 'vartrack' but the run's synthetic task is 'multihop'"):
    specs.open_sources("synthetic:vartrack", specs.DataOptions(task=task))
  with pytest.raises(DatasetError, match="this run has none \\(a HF checkpoint"):
    specs.open_sources("synthetic:multihop")
  # The key names how the text form is written (it changed); the ids form's key is its settings.
  assert named.key()["data.task"] == dataclasses.asdict(task)
  text_task = dataclasses.replace(task, form="text")
  text = _one("synthetic:multihop", task=text_task, size=5)
  assert text.key()["data.task"] == {**dataclasses.asdict(text_task),
                                     "text_form": "leading-spaces"}


# --- tfds -----------------------------------------------------------------------


def test_tfds_directory(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  from memrecall.data import tfds_builders as tb
  task = TaskConfig(task="multihop", form="ids", length=64, hops=2)
  sizes = {"train": 3, "test": 2}
  builder = tb.SyntheticTasks(config=tb.synthetic_config(task, split_sizes=sizes),
                              data_dir=str(tmp_path))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=1))
  directory = str(builder.data_dir)
  assert os.path.exists(os.path.join(directory, "dataset_info.json"))
  named = _one("tfds:" + directory, split="test")
  assert named.path == directory
  assert named.name == f"synthetic_tasks/{builder.builder_config.name}/1.2.0"
  expected = synthetic_splits(task, sizes)["test"]
  assert [e.to_json() for e in named.source] == [e.to_json() for e in expected]
  assert len(_one("tfds:" + directory).source) == 3  # the default split, train
  with pytest.raises(DatasetError, match=rf"{re.escape(directory)}: no split 'validation'; "
                                         "the dataset has test, train"):
    specs.open_sources("tfds:" + directory, specs.DataOptions(split="validation"))
  with pytest.raises(DatasetError, match="no dataset_info.json"):
    specs.open_sources(f"tfds:{tmp_path}")


def test_tfds_is_optional(tmp_path, monkeypatch):
  # specs imports without tensorflow_datasets (the GPU image lacks it) ...
  code = ("import sys; sys.modules['tensorflow_datasets'] = None\n"
          "from memrecall.data import specs\n"
          "try:\n"
          "  specs.open_sources('tfds:' + sys.argv[1])\n"
          "except ImportError as e:\n"
          "  print(e)\n")
  root = os.path.dirname(os.path.dirname(HERE))
  out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=root, check=True,
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": root})
  # ... and names the install when the kind needs it.
  assert "pip install 'memrecall[data]'" in out.stdout and str(tmp_path) in out.stdout
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(ImportError, match=re.escape("pip install 'memrecall[data]'")):
    specs.open_sources(f"tfds:{tmp_path}")
