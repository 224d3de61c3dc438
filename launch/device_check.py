r"""One call on an accelerator machine: versions, carried wheels, the numerics tests, the 7B bench.

  bash launch/device_check.sh            # one H100/H200: ends within 8 minutes
  bash launch/device_check.sh --smoke    # the same path at tiny shapes on CPU (< 3 minutes)
  # 15 minutes of device time in two calls, each within 8 minutes (a subset shares them):
  bash launch/device_check.sh --steps=info,wheels,tests
  bash launch/device_check.sh --steps=info,wheels,decode,gate,memagent,all,gate_stream

Each step runs in its own process group under a time bound (`FULL_BOUNDS`, printed first; the
bounds add up to at most 8 minutes, and time a step leaves unused passes to the next ones), so
one slow step costs its own row ("TIMEOUT"), not the others.  The bench runs one mode per
process: a 7B program takes minutes to compile, and one process per row keeps a timeout to one
row; a persistent compilation cache shares what the rows have in common (compression at 16K).
The end is one table (step, status, seconds, key numbers), also written as JSON with each
step's full numbers to `--output_dir` ($OUT when set), beside the whole log.

The orchestrator imports no JAX: on a GPU it would hold memory the steps need.  Wheels in
`.whl/` at the repository root (packages the machine lacks, e.g. ml_collections on the GPU
image, which has no network) are installed into /tmp/site first and put on the steps'
PYTHONPATH; docs/scaling.md#device-check-launchdevice_checksh says how to make that folder.
"""

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from absl import app  # noqa: E402
from launch import cli  # noqa: E402  (absl only, no JAX: the path checks every launcher makes)
SITE = "/tmp/site"
# Imported by the tests and the bench beyond jax and flax: the GPU image lacks these two.
NEEDED = ("ml_collections", "tensorboardX")
# The whole check's limits, full and smoke; a step that overruns its limit is ended within
# END_S (SIGTERM, then SIGKILL), so the bounds add up to at most the limit less that.
FULL_LIMIT_S, SMOKE_LIMIT_S, END_S = 480, 180, 10

# Seconds per step on one H100/H200.  At 7B a decode step took 4.8 ms at batch 8 on an H200
# (docs/2026-12-04-h200-decode.md), so memagent's and all's 4 updates of 1024 tokens at 16K are
# about 20 s of decoding each, plus their prefills and compile: those rows get the most.
FULL_BOUNDS = {"info": 10, "wheels": 10, "tests": 100, "decode": 75, "gate": 60, "memagent": 80,
               "all": 75, "gate_stream": 60}
SMOKE_BOUNDS = {"info": 10, "wheels": 10, "tests": 40, "decode": 40, "gate": 20, "memagent": 15,
                "all": 15, "gate_stream": 20}

# The bench at Qwen2.5-7B shapes: batch 8, 1024-token memory updates, each question its own
# 16K-token document (4 chunks, 1 read by the gate).  Their floors at an H200's ceilings (700
# TFLOP/s, 3.1 TB/s; `benchmark.mode_floor`) are gate 10.7 s, memagent 31.9 s, all 30.2 s;
# at 32K memagent's and all's (54 and 52 s) leave no time to compile in their bounds.
# gate_stream reads 1 of the 32 chunks of one 128K-token document shared by the 8 questions
# (11.4 s at the floor, timed three times: compression, the loop reading nothing, the loop);
# at 1M its compression alone is 25 s at the floor, three times over.
FULL_BENCH = ["--model=qwen2.5-7b", "--questions=8", "--memory_size=1024", "--repeats=1"]
FULL_MODES = {"gate": ["--lengths=16384", "--selected_fraction=0.25"],
              "all": ["--lengths=16384"],
              "memagent": ["--lengths=16384"],
              "gate_stream": ["--lengths=131072", "--selected_fraction=0.03125",
                              "--shared_document"]}
SMOKE_BENCH = ["--model=tiny", "--questions=2", "--memory_size=4", "--repeats=1",
               "--chunk_size=128"]
SMOKE_MODES = {"gate": ["--lengths=512", "--selected_fraction=0.25"],
               "all": ["--lengths=512"],
               "memagent": ["--lengths=512"],
               "gate_stream": ["--lengths=2048", "--selected_fraction=0.0625",
                               "--shared_document"]}
# Run in this order (after decode): gate and memagent first, the comparison the issue measures.
BENCH_MODES = ("gate", "memagent", "all", "gate_stream")
DECODE_BATCHES = "1,8"
# Numerics tests quick enough for the smoke's bound (float32 attention against a float64
# loop): they prove the path; the full check runs them all.
SMOKE_TESTS = ["-k", "test_grouped_attention_matches_a_float64_loop"]

INFO = r"""
import json, platform, jax, jaxlib, flax
devices = jax.devices()
print(json.dumps({"python": platform.python_version(), "jax": jax.__version__,
                  "jaxlib": jaxlib.__version__, "flax": flax.__version__,
                  "backend": jax.default_backend(), "devices": len(devices),
                  "device_kind": devices[0].device_kind}))
"""


class Step:
  """One bounded child process; its output goes to the shared log and is kept for parsing."""

  def __init__(self, name, argv, env=None, parse=None):
    self.name, self.argv, self.env, self.parse = name, argv, env or {}, parse or (lambda out: {})

  def run(self, bound, log):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
    log.write(f"\n===== {self.name}: {' '.join(self.argv)} (limit {bound:.0f} s)\n")
    log.flush()
    start_offset = log.tell()
    start = time.perf_counter()
    # A new session: a timeout ends the step's whole process tree (pytest's workers too).
    proc = subprocess.Popen(self.argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
      status = "ok" if proc.wait(timeout=bound) == 0 else "FAILED"
    except subprocess.TimeoutExpired:
      status = "TIMEOUT"
      _end(proc)
    seconds = time.perf_counter() - start
    log.flush()
    with open(log.name, encoding="utf-8") as f:
      f.seek(start_offset)
      out = f.read()
    try:
      numbers = self.parse(out)
    except (OSError, ValueError, KeyError, IndexError) as e:  # a step cut short has no numbers
      numbers = {"unparsed": f"{type(e).__name__}: {e}"}
    return {"step": self.name, "status": status, "seconds": round(seconds, 1), "limit_s": bound,
            "numbers": numbers, "tail": out[-1500:] if status != "ok" else ""}


def _end(proc):
  for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
    try:
      os.killpg(proc.pid, sig)
      proc.wait(timeout=wait)
      return
    except ProcessLookupError:
      return
    except subprocess.TimeoutExpired:
      continue


def _parse_info(out):
  info = json.loads(out.strip().splitlines()[-1])
  card = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip() \
      if shutil.which("nvidia-smi") else ""
  return {**info, "card": card or info["device_kind"]}


# One line per test as it ends (the tests step runs pytest verbose): under xdist
# "[gw3] [ 42%] PASSED tests/x.py::name", else "tests/x.py::name PASSED [ 42%]".
_TEST_LINE = re.compile(r"^(?:\[gw\d+\] \[\s*\d+%\] (?P<a>[A-Z]+) (?P<name_a>\S+)"
                        r"|(?P<name_b>\S+::\S+) (?P<b>[A-Z]+)\b)", re.M)


def _parse_tests(out):
  """Counts from pytest's summary; a step cut at its bound has none, and counts the tests that
  ended before it (`cut`).  Failed tests are named either way."""
  ended = [(m["a"] or m["b"], m["name_a"] or m["name_b"]) for m in _TEST_LINE.finditer(out)]
  summary = [line for line in out.splitlines() if re.search(r"\d+ (passed|failed)", line)]
  if summary:
    counts = {k: int(n) for n, k in re.findall(
        r"(\d+) (passed|failed|skipped|deselected|errors?)", summary[-1])}
  else:
    counts = {word: sum(status == word.upper() for status, _ in ended)
              for word in ("passed", "failed", "skipped", "error")}
    counts = {k: v for k, v in counts.items() if v}
    if not ended:
      raise ValueError("no test ended")
    counts["cut"] = "before pytest's summary: the tests that ended"
  failed = [name for status, name in ended if status in ("FAILED", "ERROR")]
  backend = [line for line in out.splitlines()
             if line.startswith(("memrecall tests ran on", "memrecall tests on"))]
  return {**counts, **({"failed_tests": failed} if failed else {}),
          "backend": backend[-1] if backend else "?"}


def _bench_parse(path):
  def parse(out):
    del out
    with open(path, encoding="utf-8") as f:
      rows = json.load(f)
    with open(os.path.splitext(path)[0] + "_machine.json", encoding="utf-8") as f:
      machine = json.load(f)
    return {"rows": rows, "machine": machine}
  return parse


def _key_numbers(result):
  """The table's last column: what a reader looks for in each step."""
  n = result["numbers"]
  if "unparsed" in n:
    return "-"
  step = result["step"]
  if step == "info":
    return (f"{n['card']}; Python {n['python']}, jax {n['jax']}, jaxlib {n['jaxlib']}, "
            f"flax {n['flax']}; {n['backend']} x {n['devices']}")
  if step == "wheels":
    return n.get("note", "")
  if step == "tests":
    counts = ", ".join(f"{v} {k}" for k, v in n.items()
                       if k not in ("backend", "failed_tests", "cut"))
    backend = re.sub(r"^memrecall tests (ran )?on ", "", n["backend"])
    return (f"{counts}" + (f" ({n['cut']})" if "cut" in n else "") + f"; {backend}"
            + (f"; failed: {', '.join(n['failed_tests'])}" if "failed_tests" in n else ""))
  machine = n["machine"]
  ceilings = (f"ceilings {_si(machine['ceilings']['matmul_flops'], 'FLOP/s')}, "
              f"{_si(machine['ceilings']['read_bytes'], 'B/s')}")
  if step == "decode":
    return "; ".join(f"batch {b}: {1e3 * d['seconds_per_token']:.2f} ms/step = "
                     f"{d['floor_fraction']:.2f} of floor"
                     for b, d in machine["decode_by_batch"].items()) + f"; {ceilings}"
  r = n["rows"][0]
  return (f"{r['context_tokens']} tokens: {r['total_s']:.2f} s = {r['floor_ratio']:.2f}x floor, "
          f"peak {_si(r['peak_bytes'], 'B')}")


def _si(value, unit):
  """1.23 T..., 45.6 G...: the table reads the same on a CPU and on an H200."""
  for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if value >= scale:
      return f"{value / scale:.3g} {prefix}{unit}"
  return f"{value:.3g} {unit}"


def _table(results):
  lines = [f"{'step':<12}{'status':<9}{'seconds':>8}{'bound':>7}{'limit':>7}  key numbers",
           "-" * 100]
  for r in results:
    lines.append(f"{r['step']:<12}{r['status']:<9}{r['seconds']:>8.1f}{r['bound_s']:>7.0f}"
                 f"{r['limit_s']:>7.0f}  {_key_numbers(r)}")
  return "\n".join(lines + _speedups(results))


def _speedups(results):
  """The bench table's speed-up column across the rows' processes: memagent's time over each
  mode's at the same length."""
  rows = [r["numbers"]["rows"][0] for r in results
          if r["step"] in BENCH_MODES and r["status"] == "ok"]
  memagent = {r["context_tokens"]: r["total_s"] for r in rows if r["mode"] == "memagent"}
  return [f"speed-up: {r['mode']} at {r['context_tokens']} tokens "
          f"{memagent[r['context_tokens']] / r['total_s']:.2f}x memagent's"
          for r in rows if r["mode"] != "memagent" and r["context_tokens"] in memagent]


def _steps(smoke, python, work, attention="auto"):
  bench = [python, "launch/bench.py", f"--attention={attention}"] + (SMOKE_BENCH if smoke
                                                                     else FULL_BENCH)
  modes = SMOKE_MODES if smoke else FULL_MODES
  # The bench rows share compiled programs (the model's init, the ceilings' matmuls,
  # compression at 16K) through a persistent cache: the smoke's is new each run, and the smoke
  # stays on the CPU wherever it runs.
  # MEMRECALL_VERBOSE: library logs in the log, among them each program's compile seconds, so
  # a row cut at its bound says whether it was still compiling.
  bench_env = {"JAX_COMPILATION_CACHE_DIR": os.path.join(work, "jax_cache") if smoke else
               os.environ.get("JAX_COMPILATION_CACHE_DIR", "/tmp/memrecall_jax_cache"),
               "MEMRECALL_VERBOSE": "1"}
  if smoke:
    bench_env.update(JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  steps = [Step("info", [python, "-c", INFO], bench_env if smoke else {}, _parse_info)]
  wheels = _wheels()
  if wheels:
    steps.append(Step("wheels", [python, "-m", "pip", "install", "-q", "--no-index",
                                 "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade",
                                 "--target", SITE, *wheels],
                      parse=lambda out: {"note": f"{len(wheels)} wheels into {SITE}"}))
  # Verbose (run.sh's -q, then -vv): each test's line as it ends, so a step cut at its bound
  # still says what passed and names what failed.
  steps.append(Step("tests", ["bash", "tests/run.sh", "--accelerator-only", "-vv",
                              *(SMOKE_TESTS if smoke else [])],
                    {"MEMRECALL_VENV": "none", "MEMRECALL_PYTHON": python,
                     "MEMRECALL_TEST_WORKERS": "2" if smoke else "8",
                     **({"JAX_PLATFORMS": "cpu"} if smoke else {})}, _parse_tests))
  out = os.path.join(work, "decode.json")
  steps.append(Step("decode", bench + ["--modes=", f"--decode_batches={DECODE_BATCHES}",
                                       "--nodecode_scanned", f"--output_json={out}"],
                    bench_env, _bench_parse(out)))
  for mode in BENCH_MODES:
    out = os.path.join(work, f"{mode}.json")
    steps.append(Step(mode, bench + [f"--modes={mode}", *modes[mode], "--decode_batches=",
                                     f"--output_json={out}"], bench_env, _bench_parse(out)))
  return steps, wheels


def step_bounds(names: list[str], smoke: bool) -> dict[str, int]:
  """Each step's bound in seconds.  A subset (--steps) shares the whole limit in proportion to
  its bounds: the numerics tests alone get nearly 8 minutes, so a session with 15 minutes of
  device time can run them in one call and the bench in another."""
  table, limit = (SMOKE_BOUNDS, SMOKE_LIMIT_S) if smoke else (FULL_BOUNDS, FULL_LIMIT_S)
  bounds = {name: table[name] for name in names}
  if set(names) != set(table) - ({"wheels"} if not _wheels() else set()):
    scale = (limit - END_S) / sum(bounds.values())
    bounds = {name: int(bound * scale) for name, bound in bounds.items()}
  return bounds


def _wheels() -> list[str]:
  folder = os.path.join(ROOT, ".whl")
  return sorted(os.path.join(".whl", w) for w in os.listdir(folder)
                if w.endswith(".whl")) if os.path.isdir(folder) else []


def _check_args(parser, args) -> list[str] | None:
  """The step names --steps keeps (None: all), every argument checked before anything runs: a
  typo must not run nothing and overwrite the last report (one line, status 2, as cli.run)."""
  refuse = lambda message: parser.exit(cli.USAGE_EXIT, f"{parser.prog}: error: {message}\n")
  if not args.bound_scale > 0:
    refuse(f"--bound_scale={args.bound_scale}: the bounds' multiplier must be > 0")
  try:
    cli.writable("output_dir", args.output_dir, directory=True)
  except app.UsageError as e:
    refuse(str(e))
  if not args.steps:
    return None
  names = args.steps.split(",")
  unknown = [name for name in names if name not in FULL_BOUNDS]
  if unknown:
    refuse(f"--steps: unknown {unknown}; choose from {', '.join(FULL_BOUNDS)}")
  if "wheels" in names and not _wheels():
    refuse("--steps: wheels has nothing to install (no .whl/ folder at the repository root)")
  return names


def _missing_packages() -> list[str]:
  """What the steps import that neither this Python nor a carried wheel brings (the GPU image
  has no ml_collections or tensorboardX): said before any step runs, not as every step's
  ImportError."""
  carried = {os.path.basename(w).split("-")[0].lower().replace("_", "-") for w in _wheels()}
  return [name for name in NEEDED if importlib.util.find_spec(name) is None
          and name.lower().replace("_", "-") not in carried]


def main(argv=None):
  parser = argparse.ArgumentParser(prog=os.path.basename(__file__),
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--smoke", action="store_true",
                      help="tiny shapes on CPU: proves the path in under 3 minutes")
  parser.add_argument("--output_dir", default=os.environ.get("OUT") or "/tmp/memrecall_check",
                      help="device_check.json and device_check.log go here ($OUT when set)")
  parser.add_argument("--steps", default=None,
                      help="comma-separated subset of the steps to run (default: all)")
  parser.add_argument("--attention", choices=["auto", "xla", "cudnn"], default="auto",
                      help="the bench rows' attention kernels (auto: cuDNN's on a GPU where "
                      "they apply; xla: without them, should cuDNN fail on the card)")
  parser.add_argument("--bound_scale", type=float, default=1.0,
                      help="multiplies every bound: a test on a loaded shared CPU checks the "
                      "path, not the timing")
  args = parser.parse_args(argv)
  keep = _check_args(parser, args)
  missing = _missing_packages()
  if missing:
    parser.exit(cli.USAGE_EXIT, f"{parser.prog}: error: {sys.executable} has no "
                f"{', '.join(missing)} and no wheel of it is carried in .whl/: "
                "docs/scaling.md#device-check-launchdevice_checksh says how to bring them\n")
  os.makedirs(args.output_dir, exist_ok=True)
  work = tempfile.mkdtemp(prefix="memrecall_check_")  # the bench's own JSON, read back per row
  python = sys.executable
  steps, wheels = _steps(args.smoke, python, work, args.attention)
  if keep:
    steps = [s for s in steps if s.name in keep]
  bounds = step_bounds([s.name for s in steps], args.smoke)
  limit = SMOKE_LIMIT_S if args.smoke else FULL_LIMIT_S
  assert sum(bounds.values()) + END_S <= limit, bounds
  print(f"device check ({'smoke: tiny shapes on CPU' if args.smoke else 'Qwen2.5-7B shapes'}), "
        f"python {python}; bounds: "
        + " + ".join(f"{name} {bound}" for name, bound in bounds.items())
        + f" = {sum(bounds.values())} s (+ {END_S} s to end an overrun: at most {limit} s)"
        + (f", each x {args.bound_scale}" if args.bound_scale != 1 else ""), flush=True)
  if wheels and "wheels" in bounds:  # the later steps import what they bring
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [SITE,
                                                              os.environ.get("PYTHONPATH")]))
  results, deadline = [], time.monotonic()
  log_path = os.path.join(args.output_dir, "device_check.log")
  with open(log_path, "w", encoding="utf-8") as log:
    for step in steps:
      bound = args.bound_scale * bounds[step.name]
      deadline += bound
      # Time the steps before left unused goes to this one, time they overran comes out of it:
      # the check ends within the bounds' sum.
      result = {**step.run(max(1.0, deadline - time.monotonic()), log), "bound_s": bound}
      results.append(result)
      print(f"[{step.name}] {result['status']} in {result['seconds']:.1f} s: "
            f"{_key_numbers(result)}", flush=True)
      if result["tail"]:
        print(result["tail"], flush=True)
      # After every step: a call cut short (its own time limit) keeps the steps that ended.
      _write_report(args, bounds, results)
  print(f"\n{_table(results)}")
  print(f"wrote {os.path.join(args.output_dir, 'device_check.json')} and {log_path}")
  shutil.rmtree(work, ignore_errors=True)  # the rows are in the JSON; the smoke's cache is spent
  return 0 if all(r["status"] == "ok" for r in results) else 1


def _write_report(args, bounds, results) -> None:
  path = os.path.join(args.output_dir, "device_check.json")
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump({"smoke": args.smoke, "bounds": bounds, "steps": results,
               "table": _table(results)}, f, indent=1)
  os.replace(path + ".tmp", path)


if __name__ == "__main__":
  sys.exit(main())
