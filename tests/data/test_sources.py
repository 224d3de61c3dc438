"""Example sources: synthetic random access, split seeds, host shards (no TFDS needed)."""

import itertools
import os
import subprocess
import sys

import pytest

from memrecall.data import sources
from memrecall.data.synthetic import TaskConfig, make_example

TASK = TaskConfig(task="multihop", form="ids", length=96, hops=2)


def test_synthetic_source_is_make_example():
  source = sources.SyntheticSource(TASK, seed=7, size=5)
  assert len(source) == 5 and isinstance(source, sources.ExampleSource)
  expected = [make_example(TASK, 7, i).to_json() for i in range(5)]
  assert [source[i].to_json() for i in range(5)] == expected
  assert [e.to_json() for e in source] == expected
  assert source[-1].to_json() == expected[-1]
  # Random access in any order gives the same examples.
  assert [source[i].to_json() for i in (3, 0, 4)] == [expected[i] for i in (3, 0, 4)]
  with pytest.raises(IndexError, match="out of range"):
    source[5]
  with pytest.raises(IndexError):
    source[-6]
  with pytest.raises(TypeError, match="integers"):
    source[1.0]
  with pytest.raises(ValueError, match="size"):
    sources.SyntheticSource(TASK, seed=0, size=-1)


def test_text_source_takes_a_tokenizer():
  class Words:
    def encode(self, text):
      return text.split()
  task = TaskConfig(task="hotpot", form="text", length=80, hops=2)
  source = sources.SyntheticSource(task, seed=1, size=2, tokenizer=Words())
  assert source[1].to_json() == make_example(task, 1, 1, tokenizer=Words()).to_json()


def test_split_seeds_are_distinct_and_splits_disjoint():
  seeds = {(base, split): sources.split_seed(base, split)
           for base in range(50) for split in sources.SPLITS}
  assert len(set(seeds.values())) == len(seeds)
  splits = sources.synthetic_splits(TASK, {"train": 40, "validation": 10, "test": 10}, base_seed=3)
  assert {s: len(src) for s, src in splits.items()} == {"train": 40, "validation": 10, "test": 10}
  content = {s: {(e.segments, e.question) for e in src} for s, src in splits.items()}
  for a, b in itertools.combinations(content, 2):
    assert not content[a] & content[b], (a, b)
  # Growing a split changes no other split.
  bigger = sources.synthetic_splits(TASK, {"train": 80, "test": 10}, base_seed=3)
  assert [e.to_json() for e in bigger["test"]] == [e.to_json() for e in splits["test"]]
  with pytest.raises(ValueError, match="unknown split"):
    sources.split_seed(0, "dev")


def test_list_source():
  examples = [make_example(TASK, 0, i) for i in range(3)]
  source = sources.ListSource(examples)
  assert len(source) == 3 and source[-1] is examples[2] and list(source) == examples
  with pytest.raises(TypeError, match="item 1"):
    sources.ListSource([examples[0], "not an example"])


@pytest.mark.parametrize("size", [0, 1, 7, 12, 13])
@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 8, 16])
def test_shards_are_disjoint_covering_strided_and_balanced(size, count):
  source = sources.ListSource([make_example(TASK, 0, i) for i in range(size)])
  shards = [sources.shard_for_host(source, p, count) for p in range(count)]
  ids = [[e.id for e in shard] for shard in shards]
  flat = [i for shard in ids for i in shard]
  assert sorted(flat) == sorted(e.id for e in source) and len(set(flat)) == size
  assert max(map(len, ids)) - min(map(len, ids)) <= 1
  for p, shard in enumerate(shards):
    assert len(shard) == len(ids[p])
    for k in range(len(shard)):
      assert shard.global_index(k) == p + k * count
      assert shard[k] is source[p + k * count]
  # Deterministic: the same call gives the same shard.
  assert [e.id for e in sources.shard_for_host(source, count - 1, count)] == ids[-1]
  even = [sources.shard_for_host(source, p, count, drop_remainder=True) for p in range(count)]
  assert {len(s) for s in even} == {size // count}
  kept = list(source)[:size // count * count]
  assert sorted(e.id for s in even for e in s) == sorted(e.id for e in kept)


def test_shard_arguments_are_checked():
  source = sources.SyntheticSource(TASK, 0, 4)
  with pytest.raises(ValueError, match="process_index 2"):
    sources.shard_for_host(source, 2, 2)
  with pytest.raises(ValueError, match="process_count"):
    sources.shard_for_host(source, 0, 0)
  # Shards nest: a host's shard split again over its local loaders.
  inner = sources.shard_for_host(sources.shard_for_host(source, 1, 2), 1, 2)
  assert [e.id for e in inner] == [source[3].id]


def test_sources_module_does_not_import_tfds():
  code = ("import sys, memrecall.data.sources; "
          "assert 'tensorflow_datasets' not in sys.modules and 'tensorflow' not in sys.modules")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
