"""Document files: formats and clear errors."""

import json

import pytest

from memrecall import documents


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


@pytest.mark.parametrize("name,content,message", [
    ("e.txt", b"", "is empty"),
    ("blank.txt", b"  \n ", "is empty"),
    ("latin1.txt", "caf\u00e9".encode("latin-1"), "not UTF-8 text \\(invalid byte at offset 3\\)"),
    ("bad.json", b"[{", "invalid JSON at line 1"),
    ("norow.json", b'[{"context": "x"}]', None),
    ("nocontext.json", b'[{"input": "q"}]', "row 0: missing or empty 'context'"),
    ("empty.json", b"[]", "empty list"),
    ("scalar.json", b"[1, \"a\"]", "row 0: expected an object"),
])
def test_errors_name_the_problem(tmp_path, name, content, message):
  path = tmp_path / name
  path.write_bytes(content)
  if message is None:
    with pytest.raises(documents.DocumentError, match="has 1 rows; row 5 does not exist"):
      documents.read_document(path, row=5)
    return
  with pytest.raises(documents.DocumentError, match=message):
    documents.read_document(path)


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    documents.read_document(tmp_path / "nope.txt")
