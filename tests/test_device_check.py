"""launch/device_check.sh --smoke: every step of the GPU check, at tiny shapes on CPU; bad
arguments refused before any step runs."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_runs_every_step_and_reports_a_table_and_json(tmp_path):
  # The steps set their own backends and devices, as on the GPU machine, where none of these
  # is set; $OUT would take the report.  (The suite's JAX_DISABLE_MOST_OPTIMIZATIONS stays:
  # the path is checked here, not its speed.)
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "MEMRECALL_TEST_BACKEND", "OUT")}
  env["MEMRECALL_PYTHON"] = sys.executable
  # Bounds x 3: this test shares its CPU with the rest of the suite.  Its own bounds (3 minutes
  # in all) are asserted below as configured; a step past its bound would show TIMEOUT.
  proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "device_check.sh"), "--smoke",
                         "--bound_scale=3", f"--output_dir={tmp_path}"], capture_output=True,
                        text=True, env=env, timeout=900)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  report = json.load(open(tmp_path / "device_check.json"))
  steps = {s["step"]: s for s in report["steps"]}
  expected = ["info", "tests", "decode", "gate", "memagent", "all", "gate_stream"]
  assert [s for s in steps if s != "wheels"] == expected  # wheels: only with a .whl/ folder
  assert all(s["status"] == "ok" for s in steps.values())
  assert sum(report["bounds"].values()) <= 180  # unscaled
  assert steps["info"]["numbers"]["backend"] == "cpu"
  tests = steps["tests"]["numbers"]
  assert tests["passed"] > 0 and "failed" not in tests and "backend cpu" in tests["backend"]
  decode = steps["decode"]["numbers"]["machine"]["decode_by_batch"]
  assert set(decode) == {"1", "8"}
  assert all(d["floor_fraction"] > 0 and d["seconds_per_token"] > 0 for d in decode.values())
  assert decode["8"]["bytes_per_token"] > decode["1"]["bytes_per_token"]
  for mode in ("gate", "memagent", "all", "gate_stream"):
    (row,) = steps[mode]["numbers"]["rows"]
    assert row["mode"] == mode and row["total_s"] > 0 and row["floor_ratio"] > 0
  assert steps["gate_stream"]["numbers"]["rows"][0]["context_tokens"] == 2048
  # The printed table is the JSON's, one line per step after the header.
  table = report["table"].splitlines()
  assert table[0].split()[:5] == ["step", "status", "seconds", "bound", "limit"]
  assert [line.split()[0] for line in table[2:2 + len(steps)]] == list(steps)
  # Then the speed-up of the modes timed at memagent's length (512 tokens).
  assert [line.split()[:4] for line in table[2 + len(steps):]] == [
      ["speed-up:", "gate", "at", "512"], ["speed-up:", "all", "at", "512"]]
  assert report["table"] in proc.stdout and "TIMEOUT" not in proc.stdout
  # The bench rows log each compile's seconds (a row cut at its bound shows how far it got).
  log = (tmp_path / "device_check.log").read_text()
  assert "compiled compress in" in log and "compiled recall in" in log


def test_a_tests_step_cut_at_its_bound_still_counts_and_names_what_ended():
  """The first GPU run's tests were cut at their bound with nothing to show: the step runs
  pytest verbose, and the counts come from the lines of the tests that ended."""
  from launch import device_check
  cut = ("memrecall tests on jax 0.11.2, backend gpu: 1 x NVIDIA H100 80GB HBM3\n"
         "tests/test_model.py::test_a \n"
         "[gw0] [  1%] PASSED tests/test_model.py::test_a \n"
         "[gw1] [  2%] FAILED tests/test_attention.py::test_b[float32] \n"
         "[gw0] [  3%] SKIPPED tests/test_model.py::test_c \n"
         "[gw1] [  4%] PASSED tests/test_attention.py::test_d \n")
  numbers = device_check._parse_tests(cut)
  assert numbers == {"passed": 2, "failed": 1, "skipped": 1,
                     "cut": "before pytest's summary: the tests that ended",
                     "failed_tests": ["tests/test_attention.py::test_b[float32]"],
                     "backend": "memrecall tests on jax 0.11.2, backend gpu: 1 x NVIDIA H100 80GB HBM3"}
  line = device_check._key_numbers({"step": "tests", "numbers": numbers})
  assert line == ("2 passed, 1 failed, 1 skipped (before pytest's summary: the tests that "
                  "ended); jax 0.11.2, backend gpu: 1 x NVIDIA H100 80GB HBM3; failed: "
                  "tests/test_attention.py::test_b[float32]")
  # Finished: pytest's own counts, and the same names.
  done = cut + ("FAILED tests/test_attention.py::test_b[float32] - AssertionError\n"
                "=== 1 failed, 130 passed, 2 skipped in 98.1s ===\n"
                "memrecall tests ran on jax 0.11.2, backend gpu: 1 x NVIDIA H100 80GB HBM3\n")
  numbers = device_check._parse_tests(done)
  assert (numbers["failed"], numbers["passed"], numbers["skipped"]) == (1, 130, 2)
  assert "cut" not in numbers and numbers["failed_tests"] == [
      "tests/test_attention.py::test_b[float32]"]
  with pytest.raises(ValueError, match="no test ended"):
    device_check._parse_tests("memrecall tests on jax\ncollecting ...\n")


@pytest.mark.parametrize("args,message", [
    (["--steps=info,tets"], "--steps: unknown ['tets']; choose from info, wheels, tests"),
    (["--bound_scale=0"], "--bound_scale=0.0: the bounds' multiplier must be > 0"),
    (["--output_dir={file}"], "is a file, not a directory"),
    (["--output_dir=/proc/memrecall_check"], "--output_dir: cannot write in /proc"),
])
def test_bad_arguments_run_nothing_and_keep_the_last_report(tmp_path, capsys, args, message):
  from launch import device_check
  (tmp_path / "device_check.json").write_text("{}")  # the last check's report
  (tmp_path / "a_file").write_text("")
  args = [a.format(file=tmp_path / "a_file") for a in args]
  with pytest.raises(SystemExit) as exit_:
    device_check.main(["--smoke", f"--output_dir={tmp_path}", *args])
  err = capsys.readouterr().err.strip()
  assert exit_.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
  assert err.startswith("device_check.py: error: ")
  assert (tmp_path / "device_check.json").read_text() == "{}"
  assert not (tmp_path / "device_check.log").exists()


def test_a_subset_of_steps_shares_the_whole_limit():
  """The numerics tests alone get nearly the 8 minutes (a session's first call), the bench rows
  alone the same (its second); every step together keeps its own bound."""
  from launch import device_check
  full = device_check.FULL_BOUNDS
  tests = device_check.step_bounds(["info", "wheels", "tests"], smoke=False)
  bench = device_check.step_bounds(["info", "wheels", "decode", "gate", "memagent", "all",
                                    "gate_stream"], smoke=False)
  for bounds in (tests, bench):
    assert device_check.FULL_LIMIT_S - device_check.END_S - len(bounds) <= sum(
        bounds.values()) <= device_check.FULL_LIMIT_S - device_check.END_S
  assert tests["tests"] > 3.5 * full["tests"] and bench["memagent"] > full["memagent"]
  assert sum(full.values()) + device_check.END_S <= device_check.FULL_LIMIT_S


def test_packages_neither_installed_nor_carried_are_named_before_any_step(tmp_path, capsys,
                                                                          monkeypatch):
  from launch import device_check
  monkeypatch.setattr(device_check, "NEEDED", ("ml_collections", "no_such_package_memrecall"))
  with pytest.raises(SystemExit) as exit_:
    device_check.main(["--smoke", f"--output_dir={tmp_path}"])
  err = capsys.readouterr().err.strip()
  assert exit_.value.code == 2 and "has no no_such_package_memrecall and no wheel" in err, err
  assert not (tmp_path / "device_check.log").exists()


def test_the_shell_launcher_names_a_missing_python():
  proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "device_check.sh"), "--smoke"],
                        capture_output=True, text=True, timeout=60,
                        env={**os.environ, "MEMRECALL_PYTHON": "/nonexistent/python3"})
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip() == ("launch/device_check.sh: error: no python at "
                                 "/nonexistent/python3 (MEMRECALL_PYTHON, or python3)")
