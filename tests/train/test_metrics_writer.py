"""TensorBoard events written by hand, read back by a minimal parser and by TensorBoard itself."""

import glob
import struct

from memrecall.train import metrics_writer


def _varint(data, i):
  shift = value = 0
  while True:
    byte = data[i]
    i += 1
    value |= (byte & 0x7F) << shift
    shift += 7
    if not byte & 0x80:
      return value, i


def _fields(data):
  i, out = 0, []
  while i < len(data):
    key, i = _varint(data, i)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, i = _varint(data, i)
    elif wire == 1:
      value, i = data[i:i + 8], i + 8
    elif wire == 5:
      value, i = data[i:i + 4], i + 4
    else:
      length, i = _varint(data, i)
      value, i = data[i:i + length], i + length
    out.append((number, value))
  return out


def test_crc32c_known_vector():
  assert metrics_writer.crc32c(b"123456789") == 0xE3069283


def test_events_round_trip(tmp_path):
  writer = metrics_writer.MetricsWriter(str(tmp_path))
  writer.write(7, {"loss": 1.5, "reward": 0.25})
  writer.close()
  (path,) = glob.glob(str(tmp_path / "events.out.tfevents.*"))
  data = open(path, "rb").read()
  records, i = [], 0
  while i < len(data):
    (length,) = struct.unpack("<Q", data[i:i + 8])
    assert struct.unpack("<I", data[i + 8:i + 12])[0] == metrics_writer._masked_crc(data[i:i + 8])
    record = data[i + 12:i + 12 + length]
    assert struct.unpack("<I", data[i + 12 + length:i + 16 + length])[0] == \
        metrics_writer._masked_crc(record)
    records.append(record)
    i += 16 + length
  first = dict(_fields(records[0]))
  assert first[3] == b"brain.Event:2"
  second = dict(_fields(records[1]))
  assert second[2] == 7
  values = {}
  for number, value in _fields(second[5]):
    fields = dict(_fields(value))
    values[fields[1].decode()] = struct.unpack("<f", fields[2])[0]
  assert values == {"loss": 1.5, "reward": 0.25}


def test_tensorboards_own_reader_reads_the_events(tmp_path):
  """TensorBoard's event accumulator (which checks the framing CRCs) reads what the writer wrote."""
  accumulator = __import__("pytest").importorskip(
      "tensorboard.backend.event_processing.event_accumulator")
  writer = metrics_writer.MetricsWriter(str(tmp_path))
  writer.write(3, {"loss": 0.75})
  writer.write(4, {"loss": 0.5, "reward": 1.0})
  writer.close()
  (path,) = glob.glob(str(tmp_path / "events.out.tfevents.*"))
  events = accumulator.EventAccumulator(path)
  events.Reload()
  assert sorted(events.Tags()["scalars"]) == ["loss", "reward"]
  assert [(e.step, e.value) for e in events.Scalars("loss")] == [(3, 0.75), (4, 0.5)]
  assert [(e.step, e.value) for e in events.Scalars("reward")] == [(4, 1.0)]


def test_metrics_survive_a_kill_and_a_resume(tmp_path):
  from memrecall.runtime import jsonl
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
