"""Document files: formats and clear errors."""

import json
import os

import pytest

from memrecall.data import documents
from tests.conftest import LYCHEE_TEXT


def test_formats(tmp_path):
  (tmp_path / "a.txt").write_text("A long story.", encoding="utf-8")
  assert documents.read_document(tmp_path / "a.txt").text == "A long story."
  (tmp_path / "ids.json").write_text("[5, 6, 7]")
  assert documents.read_document(tmp_path / "ids.json").ids == (5, 6, 7)
  rows = [{"context": "Doc one.", "input": "Q1?", "answers": ["x"]},
          {"context": "Doc two.", "question": "Q2?", "answer": "y"}]
  (tmp_path / "rows.json").write_text(json.dumps(rows))
  first = documents.read_document(tmp_path / "rows.json")
  assert (first.text, first.question, first.answers) == ("Doc one.", "Q1?", ("x",))
  second = documents.read_document(tmp_path / "rows.json", row=1)
  assert (second.text, second.question, second.answers) == ("Doc two.", "Q2?", ("y",))
  # Extensions in any case: Q.JSON is rows (its raw JSON, answers and all, was the document).
  (tmp_path / "Q.JSON").write_text(json.dumps(rows))
  assert documents.read_document(tmp_path / "Q.JSON").question == "Q1?"
  (tmp_path / "IDS.JSON").write_text("[5, 6, 7]")
  assert documents.read_document(tmp_path / "IDS.JSON").ids == (5, 6, 7)


@pytest.mark.parametrize("name,content,message", [
    ("e.txt", b"", "is empty"),
    ("blank.txt", b"  \n ", "is empty"),
    ("latin1.txt", "caf\u00e9".encode("latin-1"), "not UTF-8 text \\(invalid byte at offset 3\\)"),
    ("bad.json", b"[{", "invalid JSON at line 1"),
    ("norow.json", b'[{"context": "x"}]', None),
    ("nocontext.json", b'[{"input": "q"}]', "nocontext.json row 0: missing field 'context'"),
    ("blankcontext.json", b'[{"context": " ", "input": "q"}]', "blankcontext.json row 0: empty context"),
    ("empty.json", b"[]", "holds no rows"),
    ("nothing.json", b"", "nothing.json is empty"),
    ("badanswer.json", b'[{"context": "c", "answers": []}]', "row 0: field 'answers' should be"),
    ("lines.jsonl", b'{"context": "c"}\n\n{"input": "q"}\n', None),
    ("scalar.json", b"[1, \"a\"]", "reads as a list of token ids, but entry 1 is 'a'"),
    ("strings.json", b"[\"a\", \"b\"]", "row 0: expected an object"),
    ("floats.json", b"[1.0, 2.0]", "reads as a list of token ids, but entry 0 is 1.0, not an integer"),
    ("number.json", b"5", "a .json rows file holds a list of rows or one row object, not 5"),
])
def test_errors_name_the_problem(tmp_path, name, content, message):
  path = tmp_path / name
  path.write_bytes(content)
  if message is None:
    rows = 2 if name.endswith(".jsonl") else 1
    with pytest.raises(documents.DocumentError, match=f"has {rows} rows; row 5 does not exist"):
      documents.read_document(path, row=5)
    if rows == 2:  # the broken row is named by row and line; the good one still reads
      assert documents.read_document(path).text == "c"
      with pytest.raises(documents.DocumentError, match="lines.jsonl row 1 \\(line 3\\): missing field"):
        documents.read_document(path, row=1)
    return
  with pytest.raises(documents.DocumentError, match=message):
    documents.read_document(path)


def test_every_row_layout_reads_through_the_one_parser(tmp_path):
  rl = {"data_source": "x", "context": "Doc.", "reward_model": {"ground_truth": ["4", "four"]},
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"}],
        "extra_info": {"question": "How many?", "num_docs": 1, "index": 0}}
  chat_only = {"context": "Doc.", "prompt": [{"role": "user", "content": "First?"},
                                             {"role": "assistant", "content": "A."},
                                             {"role": "user", "content": "Second?"}]}
  evaluation = {"context": "Doc.", "input": "Where?", "answers": ["Oslo"], "num_docs": 3,
                "index": 2}
  no_question = {"context": "Doc.", "outputs": "z"}
  rows = [rl, chat_only, evaluation, no_question, {"context": "Doc.", "query": "Why?"}]
  (tmp_path / "rows.json").write_text(json.dumps(rows))
  (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  expected = [("How many?", ("4", "four")), ("Second?", ()), ("Where?", ("Oslo",)), (None, ("z",)),
              ("Why?", ())]
  for name in ("rows.json", "rows.jsonl"):
    got = [documents.read_document(tmp_path / name, row=i) for i in range(len(rows))]
    assert [(d.question, d.answers) for d in got] == expected, name
    assert all(d.text == "Doc." and d.ids is None for d in got)


def test_lychee_example_rows():
  # LycheeMemory's example file: context, prompt, reward_model.ground_truth, extra_info.question.
  path = os.path.join(LYCHEE_TEXT, "rows.json")
  assert os.path.exists(path), f"missing {path} (../shared/fixtures beside the checkout)"
  first, second = documents.read_document(path), documents.read_document(path, row=1)
  assert (first.question, first.answers) == ("Which baseline reads raw chunks?", ("MemAgent",))
  assert (second.question, second.answers) == ("How many KV heads does the 7B backbone have?",
                                               ("4", "four"))
  assert first.text.startswith("# memrecall") and second.text


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    documents.read_document(tmp_path / "nope.txt")
  with pytest.raises(FileNotFoundError, match="nope.json does not exist"):
    documents.read_document(tmp_path / "nope.json")
