"""launch/slurm_gpu.sh and launch/tpu_pod.sh with fake `srun`, `scontrol`, `gcloud`, `python`
and `nvidia-smi` on the PATH that record what they are asked (no cluster, no jax)."""

import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A worker's or task's python: records its arguments and the variables asked for, exits with
# $FAKE_RC (train.py's 75 on preemption); as the venv's python it answers launch/env.sh.
FAKE_PYTHON = r"""#!/usr/bin/env bash
case "$*" in
  *importlib.util*) exit "${FAKE_HAS_CUDA_PLUGIN:-1}" ;;
  *"import jax; print"*) echo 0.11.2; exit 0 ;;
  "-m pip install"*) echo "pip $*" >> "$LOG"; exit 0 ;;
esac
echo "python $* [task ${SLURM_PROCID:-}]" >> "$LOG"
for name in ${SHOW:-}; do echo "env $name=${!name-<unset>}" >> "$LOG"; done
rc_name="FAKE_RC_${SLURM_PROCID:-0}"
exit "${!rc_name:-${FAKE_RC:-0}}"
"""
# srun: records its arguments, runs the command once per task (SLURM_PROCID 0, 1), and exits
# with $SRUN_RC (what srun reports after killing the other tasks: 137) or the highest status.
FAKE_SRUN = r"""#!/usr/bin/env bash
echo "srun $*" >> "$LOG"
while [[ "$1" == --* ]]; do shift; done
high=0
for task in 0 1; do
  SLURM_PROCID=$task "$@"; rc=$?; [ "$rc" -gt "$high" ] && high=$rc
done
exit "${SRUN_RC:-$high}"
"""
FAKE_SCONTROL = '#!/usr/bin/env bash\necho "scontrol $*" >> "$LOG"\n'
FAKE_NVIDIA_SMI = ('#!/usr/bin/env bash\n'
                   'echo "| NVIDIA-SMI 580.65   Driver Version: 580.65   CUDA Version: 13.0 |"\n')
# gcloud: records its arguments; `scp SRC TPU:PATH` copies SRC to the worker's home
# ($WORKER_HOME), `ssh --command CMD` runs CMD there in bash with nothing of this environment
# but PATH (so a variable reaches the worker only through the command).
FAKE_GCLOUD = r"""#!/usr/bin/env bash
echo "gcloud $*" >> "$LOG"
files=(); command=""; previous=""
for a in "$@"; do
  [ "$previous" = --command ] && command="$a"
  [[ "$a" != -* && "$previous" != --command ]] && files+=("$a")
  previous="$a"
done
if [[ " $* " == *" scp "* ]]; then
  cp "${files[-2]}" "$WORKER_HOME/${files[-1]#*:}"
elif [ -n "$command" ]; then
  cd "$WORKER_HOME" && env -i PATH="$WORKER_PATH" HOME="$WORKER_HOME" LOG="$LOG" \
    SHOW="${SHOW:-}" FAKE_RC="${FAKE_RC:-0}" bash -c "$command"
fi
"""


def _tool(directory, name, text):
  path = directory / name
  path.write_text(text)
  path.chmod(0o755)


@pytest.fixture
def sandbox(tmp_path):
  """A repository copy with the launch scripts (the real ones) and stub launchers, fake tools
  in bin/, and `run(script, *args, **env)`: the script's exit status, output and the log."""
  repo, bin_dir, home = tmp_path / "repo", tmp_path / "bin", tmp_path / "home"
  for d in (repo / "launch", bin_dir, home):
    d.mkdir(parents=True)
  for name in ("slurm_gpu.sh", "tpu_pod.sh", "env.sh"):
    shutil.copy(os.path.join(ROOT, "launch", name), repo / "launch" / name)
  for name in ("train.py", "eval.py", "bench.py"):
    (repo / "launch" / name).write_text("")
  for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("gcloud", FAKE_GCLOUD),
                     ("python", FAKE_PYTHON)):
    _tool(bin_dir, name, text)
  log = tmp_path / "log"
  log.write_text("")

  def run(script, *args, **env):
    full = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "LOG": str(log),
            "WORKER_HOME": str(home), "WORKER_PATH": f"{bin_dir}:/usr/bin:/bin",
            "MEMRECALL_VENV": "none", "SLURM_SUBMIT_DIR": str(repo), "TPU_NAME": "pod",
            "ZONE": "z", **env}
    proc = subprocess.run(["bash", str(repo / "launch" / script), *args], env=full,
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout + proc.stderr, log.read_text()

  run.repo, run.bin, run.home, run.log = repo, bin_dir, home, log
  return run


# --- launch/slurm_gpu.sh


def test_slurm_requeues_when_one_task_was_preempted_though_srun_reports_137(sandbox):
  # Task 0 saves and exits 75 first; srun kills task 1 and reports its 137.
  rc, out, log = sandbox("slurm_gpu.sh", "train.py", "--config=c", SLURM_JOB_ID="77",
                         FAKE_RC_0="75", FAKE_RC_1="0", SRUN_RC="137")
  assert "python launch/train.py --distributed --config=c [task 0]" in log
  assert "scontrol requeue 77" in log, out
  assert rc == 75
  assert not list(sandbox.repo.glob(".memrecall-preempted*"))  # the marker is cleared


def test_slurm_does_not_requeue_a_failure(sandbox):
  rc, _, log = sandbox("slurm_gpu.sh", "train.py", SLURM_JOB_ID="77", FAKE_RC_0="1",
                       SRUN_RC="137")
  assert rc == 137 and "scontrol" not in log


def test_slurm_passes_cpus_per_task_to_srun(sandbox):
  _, _, log = sandbox("slurm_gpu.sh", "eval.py", SLURM_JOB_ID="7", SLURM_CPUS_PER_TASK="32",
                      SHOW="SRUN_CPUS_PER_TASK")
  assert "env SRUN_CPUS_PER_TASK=32" in log


@pytest.mark.parametrize("script", ["tpu_pod.sh", "slurm_gpu.sh"])
def test_only_the_launchers_with_distributed_are_accepted(sandbox, script):
  rc, out, log = sandbox(script, "bench.py", "--x")
  assert rc == 2 and "runs train.py or eval.py" in out and "not bench.py" in out
  assert log == ""  # nothing started


def test_a_task_passes_sigterm_on_and_marks_its_preemption(sandbox, tmp_path):
  """SLURM signals the task's shell too: it must wait for python's checkpoint, not die."""
  _tool(sandbox.bin, "python", "#!/usr/bin/env bash\n"
        "trap 'sleep 0.5; echo saved >> \"$LOG\"; exit 75' TERM\n"
        "echo started >> \"$LOG\"; while :; do sleep 0.05; done\n")
  marker = tmp_path / "marker"
  env = {"PATH": f"{sandbox.bin}:/usr/bin:/bin", "LOG": str(sandbox.log),
         "MEMRECALL_PREEMPT_MARKER": str(marker)}
  # SLURM starts a task with the default signal handling; a runner that ignores TERM (as CI's
  # did) would pass that on, and bash cannot trap a signal ignored when it started.
  default_term = ("import os, signal, sys; signal.signal(signal.SIGTERM, signal.SIG_DFL); "
                  "os.execvp(sys.argv[1], sys.argv[1:])")
  task = subprocess.Popen([sys.executable, "-c", default_term, "bash", "-c",
                           'source launch/env.sh && memrecall_task "$@"', "t", "launch/train.py"],
                          cwd=sandbox.repo, env=env)
  try:
    deadline = time.monotonic() + 20
    while "started" not in sandbox.log.read_text():
      assert time.monotonic() < deadline
      time.sleep(0.05)
    task.send_signal(signal.SIGTERM)
    assert task.wait(timeout=20) == 75
  finally:  # a failure leaves no looping fake python behind
    if shutil.which("pkill"):
      subprocess.run(["pkill", "-KILL", "-f", f"{sandbox.bin}/python"], check=False)
    task.kill()
  assert "saved" in sandbox.log.read_text() and marker.exists()


def test_slurm_installs_the_cuda_build_of_jax_when_the_venv_has_none(sandbox, tmp_path):
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  (venv / "bin" / "activate").write_text(f'export PATH="{venv}/bin:$PATH"\n')
  (venv / ".memrecall-installed-hf,parquet").write_text("")
  _tool(venv / "bin", "python", FAKE_PYTHON)
  _, out, log = sandbox("slurm_gpu.sh", "train.py", SLURM_JOB_ID="7", MEMRECALL_VENV=str(venv))
  assert "pip -m pip install --quiet jax[cuda12]==0.11.2" in log, out
  _tool(sandbox.bin, "nvidia-smi", FAKE_NVIDIA_SMI)  # a CUDA 13 driver
  sandbox.log.write_text("")
  _, _, log = sandbox("slurm_gpu.sh", "train.py", SLURM_JOB_ID="7", MEMRECALL_VENV=str(venv))
  assert "pip -m pip install --quiet jax[cuda13]==0.11.2" in log
  sandbox.log.write_text("")
  _, _, log = sandbox("slurm_gpu.sh", "train.py", SLURM_JOB_ID="7", MEMRECALL_VENV=str(venv),
                      FAKE_HAS_CUDA_PLUGIN="0")
  assert "pip" not in log and "python launch/train.py" in log  # a plugin is there: kept


# --- launch/tpu_pod.sh


def test_tpu_sync_copies_the_checkout_files_only(sandbox):
  repo = sandbox.repo
  (repo / ".gitignore").write_text(".venv/\n/runs/\n")
  (repo / ".venv" / "bin").mkdir(parents=True)
  (repo / ".venv" / "bin" / "python").write_text("")
  (repo / "runs" / "old").mkdir(parents=True)
  (repo / "runs" / "old" / "ckpt").write_text("")
  (repo / "gone.py").write_text("")
  git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
  subprocess.run([*git, "init", "-q"], check=True)
  subprocess.run([*git, "add", "."], check=True)
  (repo / "gone.py").unlink()  # tracked, deleted in the checkout
  (repo / "notes with space.txt").write_text("new")  # untracked, not ignored
  rc, out, log = sandbox("tpu_pod.sh", "eval.py", SYNC="1", REMOTE_DIR="~/memrecall")
  assert rc == 0, out
  synced = sandbox.home / "memrecall"
  files = {str(p.relative_to(synced)) for p in synced.rglob("*") if p.is_file()}
  assert files == {".gitignore", "launch/env.sh", "launch/slurm_gpu.sh", "launch/tpu_pod.sh",
                   "launch/train.py", "launch/eval.py", "launch/bench.py",
                   "notes with space.txt"}
  assert not (sandbox.home / "memrecall-sync.tar.gz").exists()
  assert "python launch/eval.py --distributed" in log  # then ran there


def test_tpu_forwards_the_python_and_the_listed_variables(sandbox):
  flags = "--xla_tpu_enable_async_collective_fusion=true --xla_foo='a b'"
  show = "MEMRECALL_VENV MEMRECALL_PYTHON MEMRECALL_VERBOSE XLA_FLAGS JAX_TRACEBACK_FILTERING"
  rc, out, log = sandbox("tpu_pod.sh", "train.py", "--config=x y", REMOTE_DIR=str(sandbox.repo),
                         MEMRECALL_PYTHON="/opt/py 3.12/bin/python", MEMRECALL_VERBOSE="1",
                         XLA_FLAGS=flags, WORKER_ENV="XLA_FLAGS JAX_TRACEBACK_FILTERING=off",
                         SHOW=show)
  assert rc == 0, out
  assert "python launch/train.py --distributed --config=x y" in log
  for line in ["MEMRECALL_VENV=none", "MEMRECALL_PYTHON=/opt/py 3.12/bin/python",
               "MEMRECALL_VERBOSE=1", f"XLA_FLAGS={flags}", "JAX_TRACEBACK_FILTERING=off"]:
    assert f"env {line}\n" in log, log


@pytest.mark.parametrize("worker_env, message", [
    ("1BAD=x", "'1BAD=x' is not NAME or NAME=VALUE"),
    ("NOT_SET_HERE", "NOT_SET_HERE is not set here"),
])
def test_tpu_refuses_a_bad_worker_env(sandbox, worker_env, message):
  rc, out, log = sandbox("tpu_pod.sh", "train.py", WORKER_ENV=worker_env)
  assert rc == 2 and message in out and log == ""


def test_tpu_reruns_a_preempted_command_up_to_max_resumes(sandbox):
  rc, out, log = sandbox("tpu_pod.sh", "train.py", REMOTE_DIR=str(sandbox.repo), FAKE_RC="75",
                         MAX_RESUMES="2")
  assert rc == 75
  runs = [line for line in log.splitlines() if line.startswith("python launch/train.py")]
  assert runs == ["python launch/train.py --distributed [task ]"] * 3  # the run and 2 resumes
  assert out.count("rerunning") == 2 and "stopping; rerun this script" in out
