"""launch/eval.py in two processes (jax.distributed on localhost, 2 CPU devices each): disjoint
rows, one merged output equal to a one-process run's, and a resume after one process is killed.

All three runs share a persistent compilation cache, so only the first compiles the loop.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from memrecall.runtime import jsonl
from tests.conftest import LYCHEE_TEXT, cpu_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = LYCHEE_TEXT
ROWS = 8  # 4 per process: 2 batches of 2, so a kill after the first lands mid-run


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _rows_file(path) -> str:
  """ROWS question rows cut from the fixture's text; the questions differ so that the random
  model's answers differ too (a row given another's prediction shows)."""
  rows = json.load(open(os.path.join(FIXTURE, "rows.json")))
  text = rows[0]["context"] + rows[1]["context"]
  questions = ["Which baseline reads raw chunks?", "What is compressed?", "Who gates?",
               "Where is memory kept?"]
  json.dump([{"context": text[i * 700:i * 700 + 650], "input": questions[i % 4],
              "answers": [f"part {i}"]} for i in range(ROWS)], open(path, "w"))
  return str(path)


def _start(tmp_path, output_dir, process=None, port=None):
  """One launcher process (the whole run when `process` is None)."""
  env = cpu_env(devices=2)
  env.pop("MEMRECALL_VERBOSE", None)
  flags = [f"--hf_checkpoint={FIXTURE}/hf", f"--data=rows:{tmp_path / 'rows.json'}",
           "--modes=all", "--chunk_size=512", "--memory_size=8", "--answer_tokens=8",
           "--batch_size=2", f"--output_dir={output_dir}"]
  if process is not None:
    flags += [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
              f"--process_id={process}"]
  return subprocess.Popen([sys.executable, os.path.join(ROOT, "launch", "eval.py"), *flags],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _two(tmp_path, output_dir):
  port = _free_port()
  return [_start(tmp_path, output_dir, i, port) for i in range(2)]


def _finish(proc, timeout=300) -> str:
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out[-3000:]
  return out


def _own_file(directory, process):
  return directory / f"predictions-{process:05d}-of-00002.jsonl"


def _wait_for_rows(path, count, proc, timeout=240):
  """Polls until `path` holds `count` complete rows (fails if `proc` exits first)."""
  deadline = time.monotonic() + timeout
  while len(jsonl.read(path)) < count:
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    assert time.monotonic() < deadline, f"{path} never reached {count} rows"
    time.sleep(0.05)


def _by_row(path) -> dict:
  records = jsonl.read(path)
  by_row = {(r["model"], r["data"], r["mode"], r["row"]): r for r in records}
  assert len(by_row) == len(records), f"{path} holds a row twice"
  return by_row


def test_two_processes_split_rows_merge_like_one_and_resume_after_a_kill(tmp_path):
  _rows_file(tmp_path / "rows.json")
  single, multi = tmp_path / "single", tmp_path / "multi"
  log = _finish(_start(tmp_path, single))
  # --weights=auto on CPU devices, which report no memory: sharded, and the run says so.
  assert "weights sharded over 2 device(s), " in log and "(auto: device memory unknown" in log
  assert "device memory unknown" in log
  expected = _by_row(single / "predictions.jsonl")
  assert len(expected) == ROWS and len({tuple(r["prediction_ids"]) for r in expected.values()}) > 1
  # One process keeps the layout it always had: no per-process files.
  assert {"keys.json", "predictions.jsonl", "results.json"} <= set(os.listdir(single))
  assert not [name for name in os.listdir(single) if name.startswith("predictions-")]

  # Process 1 is killed once its first batch is on disk; process 0 finishes its share and
  # waits at the barrier before the merge, where the job is then stopped too.
  procs = _two(tmp_path, multi)
  _wait_for_rows(_own_file(multi, 1), 1, procs[1])
  procs[1].send_signal(signal.SIGKILL)
  _wait_for_rows(_own_file(multi, 0), ROWS // 2, procs[0])
  procs[0].send_signal(signal.SIGKILL)
  for p in procs:
    p.communicate(timeout=60)
  before = {i: jsonl.read(_own_file(multi, i)) for i in range(2)}
  assert not (multi / "predictions.jsonl").exists()  # no merge: process 1 never got there
  killed_at = len(before[1])
  assert 0 < killed_at < ROWS // 2, f"process 1 wrote {killed_at} rows before the kill"
  # Disjoint: each process computed only its own rows (row i: process i mod 2).
  for i in range(2):
    assert {r["row"] % 2 for r in before[i]} == {i}
  own_bytes = _own_file(multi, 0).read_bytes()

  logs = [_finish(p) for p in _two(tmp_path, multi)]
  assert "(process 1 of 2)" in logs[1] and "(process 0 of 2)" not in logs[0]
  # Nothing finished was computed again: process 0's file is untouched, process 1 appended
  # exactly its missing rows after the ones it had written.
  assert _own_file(multi, 0).read_bytes() == own_bytes
  after = jsonl.read(_own_file(multi, 1))
  assert after[:killed_at] == before[1] and len(after) == ROWS // 2
  assert sorted(r["row"] for r in after) == list(range(1, ROWS, 2))
  # One merged output, every row once, equal to the one-process run's.
  assert _by_row(multi / "predictions.jsonl") == expected
  assert json.load(open(multi / "results.json")) == json.load(open(single / "results.json"))


def test_an_output_dir_that_hosts_do_not_share_is_refused_before_any_row(tmp_path):
  """Each host's own output directory (a local disk on each) would hold only that host's rows:
  every process stops before its first row, naming the other it cannot see (not after
  evaluating its share, nor reporting half the rows with exit status 0), and leaves nothing."""
  _rows_file(tmp_path / "rows.json")
  port = _free_port()
  procs = [_start(tmp_path, tmp_path / f"host{i}", i, port) for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for i, out in enumerate(outs):
    assert procs[i].returncode == 2, out[-3000:]
    assert (f"--output_dir {tmp_path / f'host{i}'} must be on a file system every host sees: "
            f"process {i} does not see there the files process(es) {1 - i} made") in out, out
    assert "rows (process" not in out  # no batch was evaluated
    assert os.listdir(tmp_path / f"host{i}") == []  # its probe removed, nothing else written


def test_rows_missing_after_every_process_finished_are_named(tmp_path):
  """The end-of-run check, for a file that is gone or rows its file lacks after the start's
  check passed: the results would cover a fraction of the rows."""
  from memrecall.evaluate import evaluator
  asked = {("m", "d", "all", i) for i in range(4)}
  rows = [{"model": "m", "data": "d", "mode": "all", "row": i} for i in (0, 2)]
  (tmp_path / "predictions-00000-of-00002.jsonl").write_text("")
  with pytest.raises(RuntimeError) as error:
    evaluator.check_every_row(str(tmp_path), asked, rows, processes=2)
  assert str(error.value).startswith(
      f"2 of the 4 rows are not in {tmp_path} after every process finished (those of process 1: "
      "predictions-00001-of-00002.jsonl is missing there).  The output directory")
  (tmp_path / "predictions-00001-of-00002.jsonl").write_text("")
  with pytest.raises(RuntimeError, match="those of process 1: their files lack them"):
    evaluator.check_every_row(str(tmp_path), asked, rows, processes=2)
  evaluator.check_every_row(str(tmp_path), asked, rows + [{**rows[0], "row": i} for i in (1, 3)],
                            processes=2)
