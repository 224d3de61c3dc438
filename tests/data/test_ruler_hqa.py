"""RULER-HQA builder and readers on tiny HotpotQA- and MemAgent-format fixtures.

The fixtures (fixtures/make_ruler_fixtures.py) hold 14 dev questions of 10
paragraphs each (139 distinct paragraphs: questions 12 and 13 share one) and
two MemAgent eval files for rows 3, 9 and 5 with 20 documents, one with text
contexts and one with pool indices, as MemAgent's scripts lay them out.
"""

import dataclasses
import json
import os
import re

import numpy as np
import pytest

from memrecall.data import ruler_hqa
from memrecall.data.example import Example, tokenize
from memrecall.data.ruler_hqa import DatasetError
from memrecall.models.tokenizer import ByteTokenizer
from tests.data.pre_tokens import cuts_keep_pre_tokens

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
DEV = os.path.join(FIXTURES, "hotpot_dev_tiny.json")
EVAL = os.path.join(FIXTURES, "memagent_eval_20.json")
EVAL_INDICES = os.path.join(FIXTURES, "memagent_eval_idx_20.json")
POOL_SIZE = 139


@pytest.fixture(scope="module")
def rows():
  return ruler_hqa.load_hotpotqa(DEV)


@pytest.fixture(scope="module")
def built(rows):
  return ruler_hqa.build_ruler_hqa(rows, num_docs=20, num_questions=14, seed=0)


def raw_rows():
  with open(DEV, encoding="utf-8") as f:
    return json.load(f)


def paragraph(title, sentences):
  return title + "\n" + "".join(sentences)


def blocks(context):
  """Document texts of a context, parsed independently of the module."""
  parts = re.split(r"(?:^|\n\n)Document (\d+):\n", context)
  assert parts[0] == ""
  numbers, texts = parts[1::2], parts[2::2]
  assert numbers == [str(i + 1) for i in range(len(numbers))]
  return texts


def test_load_hotpotqa(rows):
  assert len(rows) == 14
  row = rows[5]
  assert (row.id, row.answer, row.type, row.level) == ("5a000005dev", "yes", "comparison", "hard")
  assert len(row.context) == 10 and row.context[3][0] == "Fay Chen"
  assert row.context[3][1][1] == " Fay Chen was born in Perth."
  assert row.supporting_facts == (("Fay Chen", 0), ("Perth", 0))
  assert len(ruler_hqa.document_pool(rows)) == POOL_SIZE


def test_block_layout(rows, built):
  assert len(built) == 14
  for example, row in zip(built, rows):
    assert isinstance(example, Example) and example.task == "ruler_hqa"
    heads = [s for s in example.segments if s.startswith("Document ")]  # one per block
    assert [h.split(":", 1)[0] for h in heads] == [f"Document {i + 1}" for i in range(20)]
    assert not example.segments[-1].endswith("\n\n")
    texts = blocks(example.context)
    assert len(texts) == 20 and len(set(texts)) == 20
    assert example.context == "\n\n".join(f"Document {i + 1}:\n{t}" for i, t in enumerate(texts))
    own = [paragraph(t, s) for t, s in row.context]
    assert all(texts.count(p) == 1 for p in own)          # every own paragraph, once
    assert len(set(texts) - set(own)) == 10                # the rest are other dev paragraphs
    assert example.question == row.question and example.answers == (row.answer,)
    assert example.id == f"{row.id}/20"
    assert example.metadata == {"num_docs": 20, "hotpot_id": row.id, "type": row.type,
                                "level": row.level, "row": rows.index(row), "seed": 0}


def fact_ends(context, row):
  """[(character offset where a gold sentence ends in `context`, its memory line)], in reading
  order, each fact once."""
  ends = []
  for title, k in dict.fromkeys(row.supporting_facts):
    sentences = dict(row.context)[title]
    if k < len(sentences):
      start = context.index(":\n" + paragraph(title, sentences)) + 2 + len(title) + 1
      ends.append((start + sum(len(s) for s in sentences[:k + 1]), k,
                   f"{title}: {sentences[k].strip()}"))
  return [(end, line) for end, _, line in sorted(ends)]


def check_facts(example, row):
  """Supporting segments end at gold sentences; the memory after each holds exactly the facts
  read by then, in reading order; every gold paragraph has a supporting segment."""
  ends = np.cumsum([len(s) for s in example.segments])
  facts = fact_ends(example.context, row)
  for j, memory in zip(example.supporting, example.oracle_memory):
    assert memory.split("\n") == [line for end, line in facts if end <= ends[j]]
  for end, _ in facts:  # the segment in which a fact's last character lies is supporting
    assert int(np.searchsorted(ends, end - 1, side="right")) in example.supporting
  for j in example.supporting:  # ends at a fact (blanks after it aside), or is a factless block
    end, start = len(example.context[:ends[j]].rstrip()), ends[j] - len(example.segments[j])
    assert end in {len(example.context[:e].rstrip()) for e, _ in facts} or (
        example.segments[j].startswith("Document ")
        and not any(start < e <= ends[j] for e, _ in facts))
  heads = [example.context.rfind("Document ", 0, ends[j] - 1) for j in example.supporting]
  titles = {example.context[h:].split("\n")[1] for h in heads}
  assert titles == {t for t, _ in row.supporting_facts}


def test_supporting_segments_and_oracle_memory(rows, built):
  positions = set()
  for example, row in zip(built, rows):
    check_facts(example, row)
    texts = blocks(example.context)
    titles = {t for t, _ in row.supporting_facts}
    positions.update(i for i, t in enumerate(texts) if t.split("\n", 1)[0] in titles)
  assert built[9].oracle_memory[-1].count("\n") == 1       # the out-of-range fact is skipped
  assert set(built[3].oracle_memory[-1].split("\n")) == {"Dev Patel: Dev Patel was born in Pune.",
                                                         "Pune: Pune is a city in India."}
  assert max(positions) >= 10                              # gold paragraphs are shuffled in


def test_a_paragraph_is_cut_after_each_supporting_sentence(rows):
  """Two facts in one paragraph give two supporting segments (the memory grows a line at
  each); a paragraph whose only fact points past its end supports as a whole block."""
  row = dataclasses.replace(rows[9], supporting_facts=(("Jude Kerr", 1), ("Jude Kerr", 0),
                                                       ("Graz", 7)))
  (example,) = ruler_hqa.build_ruler_hqa([*rows[:9], row, *rows[10:]], num_docs=20,
                                         num_questions=1, indices=[9])
  check_facts(example, row)
  pieces = [example.segments[j] for j in example.supporting]
  assert pieces[0].endswith("\nJude Kerr\nJude Kerr is a painter.")
  assert pieces[1] == " Jude Kerr was born in Graz."
  assert pieces[2].startswith("Document ") and pieces[2].split("\n")[1] == "Graz"
  assert example.segments[example.supporting[1] + 1].startswith(" Her works hang")
  both = "Jude Kerr: Jude Kerr is a painter.\nJude Kerr: Jude Kerr was born in Graz."
  assert example.oracle_memory == ("Jude Kerr: Jude Kerr is a painter.", both, both)


def test_blank_sentences_at_a_paragraphs_end_leave_its_separator_with_the_last_fact(rows):
  """Facts on a paragraph's last real sentence and on an empty one after it: one segment runs
  to the block's end (".\n\n" is one pre-token), no segment is the bare separator."""
  title, sentences = rows[9].context[[t for t, _ in rows[9].context].index("Jude Kerr")]
  context = tuple((t, (*s, "") if t == title else s) for t, s in rows[9].context)
  row = dataclasses.replace(rows[9], context=context,
                            supporting_facts=(("Jude Kerr", 0), ("Jude Kerr", 2), ("Jude Kerr", 3),
                                              ("Graz", 0)))
  (example,) = ruler_hqa.build_ruler_hqa([*rows[:9], row, *rows[10:]], num_docs=20,
                                         num_questions=1, indices=[9])
  check_facts(example, row)
  last = example.segments[example.supporting[1]]
  assert last == " Jude Kerr was born in Graz. Her works hang in many halls.\n\n"
  assert example.oracle_memory[1].split("\n") == [
      "Jude Kerr: Jude Kerr is a painter.", "Jude Kerr: Her works hang in many halls.",
      "Jude Kerr: "]
  assert all(segment.strip() for segment in example.segments)


def test_the_oracle_memory_changes_in_the_chunk_where_its_sentence_ends(rows, built):
  """A gold paragraph straddling two chunks: the fact is written in the chunk that reads its
  sentence's last byte, before the paragraph ends (byte tokens: UTF-8 offsets are positions)."""
  tokenizer = ByteTokenizer()
  checked = 0
  for example, row in zip(built, rows):
    tokenized = tokenize(example, tokenizer)
    at = lambda offset: len(example.context[:offset].encode())
    assert len(tokenized.context) == at(len(example.context))
    for char_end, line in fact_ends(example.context, row):
      end, paragraph_end = at(char_end), at(example.context.find("\n\n", char_end))
      for chunk_size in (16, 32, 64):
        fact_chunk = (end - 1) // chunk_size
        if paragraph_end < 0 or (paragraph_end - 1) // chunk_size == fact_chunk:
          continue
        trace = [tokenizer.decode(m).split("\n") for m in tokenized.oracle_trace(chunk_size, ())]
        assert line in trace[fact_chunk]
        assert fact_chunk == 0 or line not in trace[fact_chunk - 1]
        checked += 1
  assert checked >= 20


def test_seeds(rows, built):
  again = ruler_hqa.build_ruler_hqa(rows, num_docs=20, num_questions=14, seed=0)
  assert [e.segments for e in again] == [e.segments for e in built]
  other = ruler_hqa.build_ruler_hqa(rows, num_docs=20, num_questions=14, seed=1)
  assert sum(a.segments != b.segments for a, b in zip(other, built)) >= 13
  # A question's layout depends on (seed, its row), not on how many questions are built.
  few = ruler_hqa.build_ruler_hqa(rows, num_docs=20, num_questions=3, seed=0)
  assert [e.segments for e in few] == [e.segments for e in built[:3]]
  picked = ruler_hqa.build_ruler_hqa(rows, num_docs=20, num_questions=2, indices=[9, 3])
  assert [e.segments for e in picked] == [built[9].segments, built[3].segments]


def test_whole_pool_and_json_round_trip(rows):
  (example,) = ruler_hqa.build_ruler_hqa(rows, num_docs=POOL_SIZE, num_questions=1)
  assert sorted(blocks(example.context)) == ruler_hqa.document_pool(rows)
  assert Example.from_json(example.to_json()) == example


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_docs=9, num_questions=14), "num_docs=9"),
    (dict(num_docs=POOL_SIZE + 1, num_questions=14), "num_docs=140"),
    (dict(num_docs=20, num_questions=0), "positive"),
    (dict(num_docs=20, num_questions=15), "only 14"),
    (dict(num_docs=20, num_questions=3, indices=[1, 2]), "only 2"),
    (dict(num_docs=20, num_questions=2, indices=[1, 1]), "distinct"),
    (dict(num_docs=20, num_questions=1, indices=[14]), "distinct"),
])
def test_impossible_parameters(rows, kwargs, match):
  with pytest.raises(ValueError, match=match):
    ruler_hqa.build_ruler_hqa(rows, **kwargs)


def test_read_memagent_eval_unlabelled():
  examples = ruler_hqa.read_memagent_eval(EVAL)
  with open(EVAL, encoding="utf-8") as f:
    items = json.load(f)
  assert [e.metadata["index"] for e in examples] == [3, 9, 5]
  for example, item in zip(examples, items):
    assert example.segments == (item["context"],) and example.supporting == ()
    assert example.question == item["input"] and example.answers == tuple(item["answers"])
    assert example.metadata["num_docs"] == 20 and example.oracle_memory == ()
  assert ruler_hqa.memagent_indices(EVAL) == [3, 9, 5]


def test_read_memagent_eval_labelled(rows):
  examples = ruler_hqa.read_memagent_eval(EVAL, hotpotqa=rows)
  with open(EVAL, encoding="utf-8") as f:
    items = json.load(f)
  for example, item in zip(examples, items):
    assert example.context == item["context"]
    check_facts(example, rows[item["index"]])
    assert example.metadata["hotpot_id"] == rows[item["index"]].id
  # The pool-index file is the same data stored the other way.
  from_indices = ruler_hqa.read_memagent_eval(EVAL_INDICES, hotpotqa=rows)
  assert [(e.segments, e.supporting, e.oracle_memory) for e in from_indices] == \
         [(e.segments, e.supporting, e.oracle_memory) for e in examples]


def test_read_memagent_eval_errors(rows, tmp_path):
  with pytest.raises(DatasetError, match=r"memagent_eval_idx_20.json row 0: .*pool indices"):
    ruler_hqa.read_memagent_eval(EVAL_INDICES)
  shifted = ruler_hqa.load_hotpotqa(DEV)[1:]                # the wrong dev file
  with pytest.raises(DatasetError, match=r"memagent_eval_20.json row 0: .*differs"):
    ruler_hqa.read_memagent_eval(EVAL, hotpotqa=shifted)
  with open(EVAL, encoding="utf-8") as f:
    items = json.load(f)
  items[0]["context"] = items[0]["context"].replace("Dev Patel\nDev Patel is", "Dev Patel\nDev is")
  path = tmp_path / "edited.json"
  path.write_text(json.dumps(items))
  with pytest.raises(DatasetError, match=r"edited.json row 0: gold paragraph 'Dev Patel' .* is missing"):
    ruler_hqa.read_memagent_eval(path, hotpotqa=rows)
  items[1]["num_docs"] = 20.0  # pandas' form of an int column with gaps: named, not "missing"
  path = tmp_path / "floats.json"
  path.write_text(json.dumps(items))
  with pytest.raises(DatasetError, match=r"floats.json row 1: field 'num_docs' should be int, got float"):
    ruler_hqa.read_memagent_eval(path)
  items[1]["num_docs"] = 20
  del items[2]["index"]
  path = tmp_path / "eval.json"
  path.write_text(json.dumps(items))
  with pytest.raises(DatasetError, match=rf"{re.escape(str(path))} row 2: missing field 'index'"):
    ruler_hqa.read_memagent_eval(path)


def test_read_rows(tmp_path):
  path = tmp_path / "lychee.json"
  path.write_text(json.dumps([
      {"context": "Ada was born in Oslo.", "input": "Where was Ada born?", "answers": ["Oslo"]},
      {"context": "Bo likes tea.", "question": "What does Bo like?", "answer": "tea", "num_docs": 3},
  ]))
  first, second = ruler_hqa.read_rows(path)
  assert first == Example(id="0", task="lychee", segments=("Ada was born in Oslo.",), supporting=(),
                          question="Where was Ada born?", answers=("Oslo",))
  assert second.answers == ("tea",) and second.metadata == {"row": 1, "num_docs": 3}
  lines = tmp_path / "rows.jsonl"
  lines.write_text('{"context": "x y", "query": "q?", "outputs": ["y", "z"]}\n\n'
                   '{"context": "u", "input": "v?", "answers": "u"}\n')
  examples = ruler_hqa.read_rows(lines, task="mine")
  assert [(e.task, e.question, e.answers) for e in examples] == [("mine", "q?", ("y", "z")),
                                                                  ("mine", "v?", ("u",))]
  single = tmp_path / "one.json"
  single.write_text(json.dumps({"context": "c", "input": "q", "answers": ["a"]}))
  assert len(ruler_hqa.read_rows(single)) == 1


def test_row_files_by_extension_in_any_case_and_lines_split_at_newlines_alone(tmp_path):
  """`.JSONL` is JSON lines; a string may hold U+2028, U+2029 or U+0085 unescaped (MemAgent
  writes with ensure_ascii=False), which str.splitlines took for line ends."""
  rows = [{"context": "Ada\u2028was born\u0085in Oslo.", "input": "Where?", "answers": ["Oslo"]},
          {"context": "Bo\u2029likes tea.", "input": "What?", "answers": ["tea"]}]
  path = tmp_path / "R.JSONL"
  path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows),
                  encoding="utf-8")
  assert [e.segments[0] for e in ruler_hqa.read_rows(path)] == [r["context"] for r in rows]
  other = tmp_path / "rows.ndjson"
  other.write_text(json.dumps(rows[0]))
  with pytest.raises(DatasetError, match=r"rows.ndjson: a rows file is .json, .jsonl, .parquet"):
    ruler_hqa.read_rows(other)
  scalar = tmp_path / "five.json"
  scalar.write_text("5")
  with pytest.raises(DatasetError, match=r"five.json: a .json rows file holds a list of rows or "
                                         r"one row object, not 5"):
    ruler_hqa.read_rows(scalar)


@pytest.mark.parametrize("row, match", [
    ({"context": "c", "input": "q"}, "missing answers"),
    ({"context": "c", "input": "q", "answers": []}, "'answers' should be"),
    ({"context": "c", "input": "q", "answers": [1]}, "'answers' should be"),
    ({"input": "q", "answers": ["a"]}, "missing field 'context'"),
    ({"context": ["c"], "input": "q", "answers": ["a"]}, "'context' should be str, got list"),
    ({"context": " ", "input": "q", "answers": ["a"]}, "empty context"),
    ({"context": "c", "answers": ["a"]}, "missing question"),
    (["c", "q"], "expected an object, got list"),
])
def test_read_rows_errors(tmp_path, row, match):
  path = tmp_path / "rows.json"
  good = {"context": "c", "input": "q", "answers": ["a"]}
  path.write_text(json.dumps([good, good, row]))
  with pytest.raises(DatasetError, match=rf"{re.escape(str(path))} row 2: .*{match}"):
    ruler_hqa.read_rows(path)


def _break(row, edit):
  row = json.loads(json.dumps(row))
  edit(row)
  return row


@pytest.mark.parametrize("edit, match", [
    (lambda r: r.pop("answer"), "missing field 'answer'"),
    (lambda r: r.pop("_id"), "missing field '_id'"),
    (lambda r: r.update(question=7), "'question' should be str, got int"),
    (lambda r: r.update(context={"a": 1}), "'context' should be list, got dict"),
    (lambda r: r["context"][2].__setitem__(1, "one sentence"), r"context\[2\] should be"),
    (lambda r: r["context"][0][1].append(3), r"context\[0\] should be"),
    (lambda r: r.update(supporting_facts=[["Nowhere", 0]]), "'Nowhere' is not among"),
    (lambda r: r.update(supporting_facts=[[r["context"][3][0], "1"]]), r"facts\[0\] should be"),
    (lambda r: r.update(supporting_facts=[[r["context"][3][0], True]]), r"facts\[0\] should be"),
    (lambda r: r.update(supporting_facts=[]), "no supporting facts"),
    (lambda r: r.pop("level"), "missing field 'level'"),
])
def test_malformed_hotpot_rows_name_file_and_row(tmp_path, edit, match):
  data = raw_rows()[:5]
  data[3] = _break(data[3], edit)
  path = tmp_path / "dev.json"
  path.write_text(json.dumps(data))
  with pytest.raises(DatasetError, match=rf"{re.escape(str(path))} row 3: .*{match}"):
    ruler_hqa.load_hotpotqa(path)


def test_unreadable_files(tmp_path):
  latin = tmp_path / "latin1.json"
  latin.write_bytes('[{"question": "Zürich?"}]'.encode("latin-1"))
  with pytest.raises(DatasetError, match=rf"{re.escape(str(latin))} is not UTF-8"):
    ruler_hqa.load_hotpotqa(latin)
  broken = tmp_path / "broken.json"
  broken.write_text('[\n{"_id": 1,\n')
  with pytest.raises(DatasetError, match=rf"{re.escape(str(broken))}: invalid JSON at line 3"):
    ruler_hqa.read_rows(broken)
  empty = tmp_path / "empty.json"
  empty.write_text("[]")
  with pytest.raises(DatasetError, match="holds no rows"):
    ruler_hqa.load_hotpotqa(empty)
  with pytest.raises(DatasetError, match="row 0: expected an object"):
    ruler_hqa.load_hotpotqa(_write(tmp_path / "ints.json", "[1, 2]"))
  with pytest.raises(FileNotFoundError, match="missing.json"):
    ruler_hqa.load_hotpotqa(tmp_path / "missing.json")


def _write(path, text):
  path.write_text(text)
  return path


def test_own_paragraphs_on_memagents_slots(rows):
  """MemAgent shuffles each question's list (own paragraphs first) with a fresh
  random.Random(4): the permutation depends on num_docs alone, so every question's own
  paragraphs sit on the same slots.  At 50 documents those are the slots LycheeMemory's
  published 50-document rows show (11, 18, 27, 29, 37, 41-44, 48, 1-based)."""
  built = ruler_hqa.build_ruler_hqa(rows, num_docs=50, num_questions=14, seed=0)
  for row, example in zip(rows, built):
    texts = blocks("".join(example.segments))
    own = {paragraph(t, s) for t, s in raw_rows()[rows.index(row)]["context"]}
    slots = {i + 1 for i, text in enumerate(texts) if text.strip("\n") in own}
    if len(own) == 10:  # a row that lists a paragraph twice keeps it once: other slots
      assert slots == {11, 18, 27, 29, 37, 41, 42, 43, 44, 48}, (row.id, sorted(slots))


def test_segments_split_where_qwen2_pre_tokens_do(rows, built):
  """Segment-by-segment tokenisation equals the whole context's for Qwen2's byte-level BPE
  (any merges): every cut falls between pre-tokens of the whole text."""
  labelled = ruler_hqa.read_memagent_eval(EVAL, hotpotqa=rows)
  for example in [*built, *labelled]:
    assert len(example.segments) > 20  # cut inside gold paragraphs
    assert cuts_keep_pre_tokens(example.segments)
