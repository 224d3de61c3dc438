"""Training metrics: TensorBoard's own reader reads the events; the JSON lines survive a kill."""

import glob

import pytest

from memrecall.runtime import jsonl
from memrecall.train import metrics_writer


def _scalars(logdir):
  """{tag: [(step, value)]} over every events file in `logdir`, read by TensorBoard itself."""
  accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
  out = {}
  for path in sorted(glob.glob(str(logdir / "events.out.tfevents.*"))):
    events = accumulator.EventAccumulator(path)
    events.Reload()
    for tag in events.Tags()["scalars"]:
      out.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
  return out


def test_tensorboards_own_reader_reads_the_events(tmp_path):
  writer = metrics_writer.MetricsWriter(str(tmp_path))
  writer.write(3, {"loss": 0.75})
  writer.write(4, {"loss": 0.5, "reward": 1.0})
  writer.close()
  assert _scalars(tmp_path) == {"loss": [(3, 0.75), (4, 0.5)], "reward": [(4, 1.0)]}
  assert jsonl.read(tmp_path / "metrics.jsonl") == [{"step": 3, "loss": 0.75},
                                                     {"step": 4, "loss": 0.5, "reward": 1.0}]


def test_metrics_survive_a_kill_and_a_resume(tmp_path):
  writer = metrics_writer.MetricsWriter(str(tmp_path))
  for step in (1, 2, 3, 4):
    writer.write(step, {"loss": step / 10})
  writer.close()
  path = tmp_path / "metrics.jsonl"
  path.write_bytes(path.read_bytes()[:-5])  # killed while writing step 4
  # The last checkpoint was step 2: steps 3 and 4 are trained, and logged, again.
  writer = metrics_writer.MetricsWriter(str(tmp_path), resumed_at=2)
  for step in (3, 4):
    writer.write(step, {"loss": step / 10})
  writer.close()
  assert [r["step"] for r in jsonl.read(path)] == [1, 2, 3, 4]
  assert path.read_text().endswith("\n")
  # Both runs' events files are read; TensorBoard keeps the later value of a repeated step.
  assert sorted(set(s for s, _ in _scalars(tmp_path)["loss"])) == [1, 2, 3, 4]


def test_tensorboard_drops_the_points_a_preempted_run_logged_after_its_checkpoint(tmp_path):
  """The directory as TensorBoard loads it: a resume from step 2 that has logged only step 3
  shows no step 4 of the run it replaces, and its own value at step 3."""
  accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
  writer = metrics_writer.MetricsWriter(str(tmp_path))
  for step in (1, 2, 3, 4):
    writer.write(step, {"loss": step / 10})
  writer.close()
  writer = metrics_writer.MetricsWriter(str(tmp_path), resumed_at=2)
  writer.write(3, {"loss": 0.125})
  writer.close()
  events = accumulator.EventAccumulator(str(tmp_path))
  events.Reload()
  assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
  assert [e.value for e in events.Scalars("loss")] == pytest.approx([0.1, 0.2, 0.125])


def test_a_run_killed_before_its_first_checkpoint_leaves_no_points_behind(tmp_path):
  accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
  writer = metrics_writer.MetricsWriter(str(tmp_path))
  for step in (1, 2, 3):
    writer.write(step, {"loss": 1.0})
  writer.close()
  writer = metrics_writer.MetricsWriter(str(tmp_path), resumed_at=0)  # starts again from 0
  writer.write(1, {"loss": 0.5})
  writer.close()
  events = accumulator.EventAccumulator(str(tmp_path))
  events.Reload()
  assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 0.5)]
  assert [r["step"] for r in jsonl.read(tmp_path / "metrics.jsonl")] == [1]
