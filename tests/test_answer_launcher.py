"""launch/answer.py end to end on the reference's tiny LycheeMemory model."""

import json
import os

import numpy as np
from tests import forked_launchers
from tests.conftest import LYCHEE_TEXT, cpu_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*flags, devices=1):
  return forked_launchers.run(os.path.join(ROOT, "launch", "answer.py"), flags, cpu_env(devices),
                             timeout=600)


def test_answer_bank_reuse_and_mismatch(tmp_path, lychee_dir, lychee_reference):
  doc = tmp_path / "doc.json"
  doc.write_text(json.dumps(lychee_reference["in/text_ids"][0].tolist()))
  question = ",".join(str(i) for i in lychee_reference["in/question_ids"][0])
  common = [f"--hf_checkpoint={lychee_dir}", f"--document={doc}", f"--question_ids={question}",
            "--chunk_size=1024", "--memory_size=8", "--max_new_tokens=8"]
  out = tmp_path / "answer.json"
  proc = _run(*common, f"--memory_bank={tmp_path / 'bank'}", f"--output_json={out}")
  assert proc.returncode == 0, proc.stderr
  assert "saved memory bank" in proc.stderr
  result = json.load(open(out))
  # The reference's greedy answer (its EOS-free ids) and a full per-chunk trace.
  np.testing.assert_array_equal(result["answer_ids"], lychee_reference["out/generated_ids"][0, 12:])
  assert [t["chunk"] for t in result["trace"]] == [0, 1, 2]
  assert all(t["read"] and t["gate_score"] is None for t in result["trace"])
  assert result["trace"][-1]["memory_ids"] == lychee_reference["gf27/input_ids"][0][-46:-38].tolist()
  assert "chunk     2" in proc.stdout and "answer:" in proc.stdout

  # On 4 devices, the weights sharded over fsdp x tensor: the bank made on one device is
  # recognised (its fingerprint is the weights', wherever they live) and the answer is the same.
  sharded = ["--mesh=fsdp=2,tensor=2"]
  again = _run(*common, *sharded, f"--memory_bank={tmp_path / 'bank'}", f"--output_json={out}",
               devices=4)
  assert again.returncode == 0 and "reusing memory bank" in again.stderr, again.stderr
  assert json.load(open(out))["answer_ids"] == result["answer_ids"]

  other = _run(*[f for f in common if not f.startswith("--chunk_size")], "--chunk_size=512",
               f"--memory_bank={tmp_path / 'bank'}")
  assert other.returncode != 0 and "chunk_size: bank has 1024, expected 512" in other.stderr

  # With the weights split over a tensor axis of the four devices (data 2 x tensor 2: the
  # tiny model has 2 KV heads): the document compressed on that mesh into a host bank, and
  # streamed.
  split = _run(*common, *sharded, "--weights=tensor", f"--output_json={out}", devices=4)
  assert split.returncode == 0, split.stderr
  assert json.load(open(out))["answer_ids"] == result["answer_ids"]
  streamed = _run(*common, *sharded, "--weights=tensor", "--stream", "--group_size=2",
                  f"--output_json={out}", devices=4)
  assert streamed.returncode == 0, streamed.stderr
  assert "weights tensor over 4 device(s) as data 2 x tensor 2" in streamed.stderr
  assert json.load(open(out))["answer_ids"] == result["answer_ids"]


def test_bad_inputs(tmp_path, lychee_dir):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  proc = _run(f"--hf_checkpoint={lychee_dir}", f"--document={empty}", "--question=hi")
  assert proc.returncode != 0 and "is empty" in proc.stderr

  latin = tmp_path / "latin.txt"
  latin.write_bytes("caf\u00e9 au lait".encode("latin-1"))
  proc = _run(f"--hf_checkpoint={lychee_dir}", f"--document={latin}", "--question=hi")
  assert proc.returncode != 0 and "not UTF-8" in proc.stderr

  short = tmp_path / "short.txt"
  short.write_text("A document much shorter than one chunk.")
  proc = _run(f"--hf_checkpoint={lychee_dir}", f"--document={short}",
              "--question=What is this document about?", "--max_question_tokens=1")
  assert proc.returncode != 0 and "over the budget of 1" in proc.stderr
  proc = _run(f"--hf_checkpoint={lychee_dir}", f"--document={short}", "--question=x",
              "--max_question_tokens=0")  # 0 is no budget: an error before any work
  assert proc.returncode == 2 and "--max_question_tokens=0: 0 is not a positive" in proc.stderr
  # A document shorter than one chunk is padded into one chunk and answered.
  proc = _run(f"--hf_checkpoint={lychee_dir}", f"--document={short}", "--question=What?",
              "--chunk_size=1024", "--memory_size=4", "--max_new_tokens=4")
  assert proc.returncode == 0, proc.stderr
  assert "1 chunks of 1024" in proc.stderr

  proc = _run(f"--hf_checkpoint={lychee_dir}", f"--document={short}", "--question=What?",
              "--mode=gate")
  assert proc.returncode != 0 and "needs a gate" in proc.stderr


def test_answer_from_a_training_run(tmp_path):
  from memrecall.train import trainer
  from tests.train.conftest import small_config
  config = small_config("sft", steps=1)
  trainer.train(config, str(tmp_path / "run"), log=lambda *a: None)
  doc = tmp_path / "doc.json"
  doc.write_text(json.dumps([300 + (i % 60) for i in range(100)]))
  out = tmp_path / "a.json"
  proc = _run(f"--checkpoint={tmp_path / 'run'}", f"--document={doc}", "--question_ids=261,300,278",
              "--memory_size=3", "--max_new_tokens=2", f"--output_json={out}")
  assert proc.returncode == 0, proc.stderr
  assert "INFO" not in proc.stderr and not any(  # orbax's INFO lines are quiet
      line[:1] in "IW" and line[1:5].isdigit() for line in proc.stderr.splitlines())
  result = json.load(open(out))
  chunks = -(-100 // config.compressor.chunk_size)  # the run's own chunk size
  assert len(result["trace"]) == chunks and result["mode"] == "gate"  # the tiny config has a gate


def test_a_bank_of_one_document_is_refused_for_another(tmp_path):
  """docs/usage.md's `--row=3 --memory_bank=...` pattern followed by another --row."""
  fixture = LYCHEE_TEXT
  common = [f"--hf_checkpoint={os.path.join(fixture, 'hf')}",
            f"--document={os.path.join(fixture, 'rows.json')}", "--chunk_size=1024",
            "--memory_size=4", "--max_new_tokens=4", f"--memory_bank={tmp_path / 'bank'}"]
  made = _run(*common, "--row=1")
  assert made.returncode == 0 and "saved memory bank" in made.stderr, made.stderr
  bank = {name: (tmp_path / "bank" / name).read_bytes() for name in os.listdir(tmp_path / "bank")}
  refused = _run(*common, "--row=0")
  assert refused.returncode == 2, refused.stderr
  message = refused.stderr.strip()
  assert len(message.splitlines()) == 1 and "Traceback" not in message
  assert "rows.json row 1" in message and "not from" in message and "rows.json row 0" in message
  assert "--recompile_bank" in message
  assert {n: (tmp_path / "bank" / n).read_bytes() for n in os.listdir(tmp_path / "bank")} == bank
  # Asked to, it rebuilds the bank from this document, which is then reused for it.
  rebuilt = _run(*common, "--row=0", "--recompile_bank")
  assert rebuilt.returncode == 0 and "saved memory bank" in rebuilt.stderr, rebuilt.stderr
  metadata = json.load(open(tmp_path / "bank" / "metadata.json"))
  assert metadata["document"].endswith("rows.json row 0") and metadata["num_tokens"] == 7189
  again = _run(*common, "--row=0")
  assert again.returncode == 0 and "reusing memory bank" in again.stderr, again.stderr
