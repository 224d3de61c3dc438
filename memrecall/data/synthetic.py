"""Synthetic long-context multi-hop tasks with exact relevance labels and oracle memory traces.

Three tasks, each in two forms — `ids` (a small vocabulary a tiny model learns
from scratch) and `text` (natural sentences for real tokenizers):

* `multihop`: a chain of key -> value facts, q -> x1 -> ... -> xh, hidden
  among distractor facts; "where do h hops from q lead?".
* `vartrack`: variable tracking, `X1 = 12345 ... X2 = X1 ...`; "which
  variables equal 12345?" (RULER's variable tracking).
* `hotpot`: two-hop questions over generated paragraphs about generated
  people, cities and countries; "in which country was P born?".

Generation is deterministic in (seed, index).  A context is built to a target
length in tokens (of the given tokenizer for the text form): the facts, then
distractors (a `distractor_density` share of the rest), then filler.  The
facts a question needs appear in reading order, so one left-to-right pass can
answer (facts in any order need several passes: docs/architecture.md#the-toy-task).
Distractors never start from an entity of the chain, so exactly the supporting
facts are relevant.

That makes the chain's entities absorbing for a reader that follows arrows
without the question: once on q, x or y nothing leads it off, and y holds it
for good.  The longer the context, the likelier such a walk ends on the answer
(multihop, from a random entity: 7% at 128 tokens, 17% at 1K, 65% at 8K, 93% at
32K), so long contexts reward a reader that lost the thread.  `chain_distractors`
(multihop) lets distractors start and end at chain entities too, except where
a reader could follow them or be held by them: between the facts that make c_k
the pointer and move it on, no distractor mentions c_k or c_(k-1) (the chunk
of the fact may still hold c_(k-1) as its pointer).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from memrecall.data.example import Example, Piece, encode
from memrecall.models.tokenizer import ByteTokenizer

TASKS = ("multihop", "vartrack", "hotpot")
FORMS = ("ids", "text")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """task: one of TASKS; form: ids | text; length: context tokens; hops: chain length
  (vartrack: assignments in the chain; hotpot: always 2); distractor_density: share of the
  context (beyond the needed facts) filled with distractor facts, the rest is filler."""
  task: str = "multihop"
  form: str = "ids"
  length: int = 256
  hops: int = 2
  distractor_density: float = 1.0
  num_entities: int = 64
  min_fact_gap: int = 0  # tokens between consecutive needed facts (= chunk size: one per chunk)
  # multihop: distractors use chain entities too, never where a correct reader would follow
  # them (see the module doc: without it, long contexts leak the answer to lost readers).
  chain_distractors: bool = False

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f"unknown task {self.task!r}; choose from {TASKS}")
    if self.form not in FORMS:
      raise ValueError(f"unknown form {self.form!r}; choose from {FORMS}")
    if not 1 <= self.hops <= SmallVocab.MAX_HOPS:  # here, not at the first example
      raise ValueError(f"hops must be in [1, {SmallVocab.MAX_HOPS}], got {self.hops}")
    if self.task == "hotpot" and self.hops != 2:
      raise ValueError("the hotpot task is two-hop: hops must be 2")
    if not 0.0 <= self.distractor_density <= 1.0:
      raise ValueError(f"distractor_density must be in [0, 1], got {self.distractor_density}")
    if self.num_entities < self.hops + 3:
      raise ValueError(f"num_entities ({self.num_entities}) must exceed hops + 2")
    if self.length <= 0:
      raise ValueError(f"length must be positive, got {self.length}")
    if self.min_fact_gap < 0:
      raise ValueError(f"min_fact_gap must be >= 0, got {self.min_fact_gap}")
    if self.chain_distractors and self.task != "multihop":
      raise ValueError(f"chain_distractors is a multihop setting, not {self.task}'s")


# How the text form is written, in the keys of what is built from it (`task_key`):
# "leading-spaces" since 2026-12-07; its segments had ended in ". ", a space that
# segment-by-segment tokenisation split from the next word.
TEXT_FORM = "leading-spaces"


def task_key(config: TaskConfig) -> dict:
  """What identifies a task's examples in the keys of evaluation results and data sources, and
  (its `text_form`) of training resumes: its settings, and for the text form how it is written."""
  key = dataclasses.asdict(config)
  if config.form == "text":
    key["text_form"] = TEXT_FORM
  return key


# --- the small vocabulary -----------------------------------------------------


class SmallVocab:
  """Token ids of the `ids` form, placed above the byte tokenizer's range (0..258)."""
  BASE = 259
  MARKERS = ("->", ";", "?", "=", "born", "in", "filler", "none")
  MAX_HOPS = 16

  def __init__(self, num_entities: int = 64, num_values: int = 16):
    names = list(self.MARKERS) + [f"H{k}" for k in range(self.MAX_HOPS + 1)]
    names += [f"e{i}" for i in range(num_entities)] + [f"v{i}" for i in range(num_values)]
    self.names = names
    self.ids = {name: self.BASE + i for i, name in enumerate(names)}
    self.num_entities, self.num_values = num_entities, num_values

  @property
  def size(self) -> int:
    """The smallest model vocabulary that holds every id."""
    return self.BASE + len(self.names)

  def __getitem__(self, name: str) -> int:
    return self.ids[name]

  def entity(self, i: int) -> int:
    return self.ids[f"e{i}"]

  def value(self, i: int) -> int:
    return self.ids[f"v{i}"]

  def hop(self, k: int) -> int:
    return self.ids[f"H{k}"]

  def decode(self, ids) -> str:
    names = {v: k for k, v in self.ids.items()}
    return " ".join(names.get(int(i), f"<{int(i)}>") for i in ids)


# --- natural-text vocabulary --------------------------------------------------

_SYLLABLES = ("ka", "lo", "mi", "ren", "sa", "tu", "vel", "do", "ra", "nim", "bo", "zen", "qua",
              "pe", "lin", "mor", "ta", "shi", "gar", "eli")
# Text segments lead with their space (" The grass is green."): a segment is tokenised alone,
# and a byte-level BPE joins a space to the word after it, as it would in the whole text.
_FILLER = (" The grass is green.", " The sky is blue.", " The sun is yellow.",
           " Here we go.", " There and back again.", " The river flows to the sea.")


def _names(rng: np.random.Generator, count: int, capitalise: bool = True) -> list[str]:
  """`count` distinct made-up names of 2-3 syllables."""
  names: set[str] = set()
  while len(names) < count:
    n = rng.integers(2, 4)
    word = "".join(rng.choice(_SYLLABLES, n))
    names.add(word.capitalize() if capitalise else word)
  ordered = sorted(names)  # not the set's order, which follows the process's string hashing
  return [ordered[i] for i in rng.permutation(len(ordered))]


# --- assembly -----------------------------------------------------------------


@dataclasses.dataclass
class _Facts:
  """What a task contributes: needed facts in order, a distractor maker, question, answers."""
  needed: list[Piece]
  distractor: Callable[[], Piece]
  question: Piece
  answers: tuple[Piece, ...]
  oracle: list[Piece]
  metadata: dict
  oracle_start: Piece = ()
  # A distractor for the stretch after k needed facts (None: `distractor` fits everywhere).
  distractor_after: Callable[[int], Piece] | None = None


def _fill(rng, facts: _Facts, config: TaskConfig, tokenizer, filler: Callable[[int], Piece]
          ) -> tuple[list[Piece], list[int]]:
  """Interleaves needed facts (in order), distractors and filler to exactly config.length tokens."""
  size = lambda p: len(encode(p, tokenizer))
  needed_tokens = sum(size(p) for p in facts.needed)
  if needed_tokens > config.length:
    raise ValueError(f"a length of {config.length} tokens is too short for the {needed_tokens} "
                     f"tokens of the needed facts ({config.task}, {config.hops} hops)")
  budget = config.length - needed_tokens
  distractors: list[Piece] = []
  used = 0
  target = config.distractor_density * budget
  while True:
    d = facts.distractor()
    if used + size(d) > target:
      break
    distractors.append(d)
    used += size(d)
  fillers = []
  remaining = budget - used
  while remaining > 0:
    piece = filler(remaining)
    fillers.append(piece)
    remaining -= size(piece)
  others = distractors + fillers
  order = rng.permutation(len(others))
  others = [others[i] for i in order]
  # Needed facts go at sorted random slots among the others: in reading order, and at least
  # `min_fact_gap` tokens apart (rejection sampling, deterministic in the rng).
  sizes = np.asarray([size(p) for p in others])
  for _ in range(1000):
    slots = np.sort(rng.choice(len(others) + len(facts.needed), len(facts.needed), replace=False))
    between = [sizes[slots[k] - k:slots[k + 1] - k - 1].sum() for k in range(len(slots) - 1)]
    if all(gap >= config.min_fact_gap for gap in between):
      break
  else:
    raise ValueError(f"could not place {len(facts.needed)} facts {config.min_fact_gap} tokens "
                     f"apart in {config.length} tokens; lengthen the context or lower the gap")
  is_distractor = iter(order < len(distractors))
  segments: list[Piece] = []
  supporting: list[int] = []
  it = iter(others)
  needed = iter(facts.needed)
  for i in range(len(others) + len(facts.needed)):
    if len(supporting) < len(facts.needed) and i == slots[len(supporting)]:
      supporting.append(len(segments))
      segments.append(next(needed))
      continue
    piece = next(it)
    if next(is_distractor) and facts.distractor_after is not None:
      piece = _redraw(piece, lambda: facts.distractor_after(len(supporting)), size)
    segments.append(piece)
  return segments, supporting


def _redraw(piece: Piece, make: Callable[[], Piece], size: Callable[[Piece], int],
            tries: int = 50) -> Piece:
  """A distractor from `make` of the same token length as `piece` (which was placed by its
  length), or `piece` itself when none comes up (text names differ in length)."""
  for _ in range(tries):
    candidate = make()
    if size(candidate) == size(piece):
      return candidate
  return piece


def _multihop(rng, config: TaskConfig, vocab: SmallVocab, names: list[str] | None) -> _Facts:
  h = config.hops
  chain = rng.choice(config.num_entities, h + 1, replace=False)  # q, x1, ..., xh
  others = np.setdiff1d(np.arange(config.num_entities), chain)
  # With chain_distractors, the distractors placed by length use no chain entity (they fit
  # anywhere); each is then redrawn for its stretch by `after`.
  target = lambda: (rng.choice(others) if config.chain_distractors
                    else rng.integers(config.num_entities))

  def pair_after(k: int) -> tuple[int, int]:
    """(source, target) of a distractor after k needed facts: neither is the pointer c_k nor
    the previous pointer c_(k-1), and no needed fact is repeated."""
    free = np.setdiff1d(np.arange(config.num_entities), chain[max(k - 1, 0):k + 1])
    while True:
      a, b = int(rng.choice(free)), int(rng.choice(free))
      if not any(a == chain[j] and b == chain[j + 1] for j in range(h)):
        return a, b

  if names is None:
    ent = vocab.entity
    needed = [(ent(chain[k]), vocab["->"], ent(chain[k + 1]), vocab[";"]) for k in range(h)]
    distractor = lambda: (ent(rng.choice(others)), vocab["->"], ent(target()), vocab[";"])
    fact = lambda a, b: (ent(a), vocab["->"], ent(b), vocab[";"])
    question = (vocab["?"], ent(chain[0]), vocab.hop(h))
    answers = ((ent(chain[h]),),)
    oracle = [(ent(chain[k + 1]), vocab.hop(k + 1)) for k in range(h)]
    # The toy task's memory, [pointer, hop] (docs/architecture.md#the-toy-task): it holds the
    # start from the first chunk on.
    start = (ent(chain[0]), vocab.hop(0))
  else:
    name = lambda i: names[i]
    needed = [f" {name(chain[k])} leads to {name(chain[k + 1])}." for k in range(h)]
    distractor = lambda: f" {name(rng.choice(others))} leads to {name(target())}."
    fact = lambda a, b: f" {name(a)} leads to {name(b)}."
    question = f"Start at {name(chain[0])} and follow {h} links. Where do you end?"
    answers = (name(chain[h]),)
    oracle = [f"After {k + 1} of {h} links: {name(chain[k + 1])}." for k in range(h)]
    start = f"After 0 of {h} links: {name(chain[0])}."
  after = (lambda k: fact(*pair_after(k))) if config.chain_distractors else None
  return _Facts(needed, distractor, question, answers, oracle,
                {"chain": [int(c) for c in chain]}, start, after)


def _vartrack(rng, config: TaskConfig, vocab: SmallVocab, names: list[str] | None) -> _Facts:
  h = config.hops
  variables = rng.choice(config.num_entities, h, replace=False)
  others = np.setdiff1d(np.arange(config.num_entities), variables)
  value = int(rng.integers(vocab.num_values))
  other_values = [v for v in range(vocab.num_values) if v != value]
  if names is None:
    ent, val = vocab.entity, vocab.value
    needed = [(ent(variables[0]), vocab["="], val(value), vocab[";"])]
    needed += [(ent(variables[k]), vocab["="], ent(variables[k - 1]), vocab[";"]) for k in range(1, h)]
    # Distractors assign other variables to other values or to each other, never to the chain.
    def distractor():
      target = (val(rng.choice(other_values)) if rng.random() < 0.5
                else ent(rng.choice(others)))
      return (ent(rng.choice(others)), vocab["="], target, vocab[";"])
    question = (vocab["?"], val(value))
    answers = (tuple(ent(v) for v in variables),)
    oracle = [tuple(ent(v) for v in variables[:k + 1]) for k in range(h)]
    # The memory starts from the value asked about: every lookup then matches the memory's
    # last token against an assignment's right-hand side.
    start = (val(value),)
  else:
    var = lambda i: f"X{names[i].upper()}"
    number = lambda v: str(10000 + 7919 * v % 90000)
    needed = [f" VAR {var(variables[0])} = {number(value)}."]
    needed += [f" VAR {var(variables[k])} = {var(variables[k - 1])}." for k in range(1, h)]
    def distractor():
      target = (number(rng.choice(other_values)) if rng.random() < 0.5
                else var(rng.choice(others)))
      return f" VAR {var(rng.choice(others))} = {target}."
    question = f"Which variables are assigned the value {number(value)}?"
    answers = (" ".join(var(v) for v in variables),)
    oracle = [f"Variables equal to {number(value)}: " + " ".join(var(v) for v in variables[:k + 1])
              for k in range(h)]
    start = f"Variables equal to {number(value)}: none yet."
  return _Facts(needed, distractor, question, answers, oracle,
                {"variables": [int(v) for v in variables], "value": value}, start)


def _hotpot(rng, config: TaskConfig, vocab: SmallVocab, names: list[str] | None) -> _Facts:
  # Entities split into people, cities and countries.
  n = config.num_entities
  people, cities, countries = np.arange(0, n // 2), np.arange(n // 2, 3 * n // 4), np.arange(3 * n // 4, n)
  person, city, country = rng.choice(people), rng.choice(cities), rng.choice(countries)
  other_people = people[people != person]
  other_cities = cities[cities != city]
  if names is None:
    ent = vocab.entity
    # Facts of 4 tokens, like the other tasks' (aligned with the beacons and the filler).
    needed = [(ent(person), vocab["born"], ent(city), vocab[";"]),
              (ent(city), vocab["in"], ent(country), vocab[";"])]
    def distractor():
      if rng.random() < 0.5:
        return (ent(rng.choice(other_people)), vocab["born"], ent(rng.choice(cities)), vocab[";"])
      return (ent(rng.choice(other_cities)), vocab["in"], ent(rng.choice(countries)), vocab[";"])
    question = (vocab["?"], ent(person), vocab["born"])
    answers = ((ent(country),),)
    # [pointer, hop] as in multihop: the person, then the city, then the country.
    oracle = [(ent(city), vocab.hop(1)), (ent(country), vocab.hop(2))]
    start = (ent(person), vocab.hop(0))
  else:
    nm = lambda i: names[i]
    needed = [f" {nm(person)} is a painter. {nm(person)} was born in {nm(city)}.",
              f" {nm(city)} is an old city. {nm(city)} lies in the country of {nm(country)}."]
    def distractor():
      if rng.random() < 0.5:
        p = nm(rng.choice(other_people))
        return f" {p} is a painter. {p} was born in {nm(rng.choice(cities))}."
      c = nm(rng.choice(other_cities))
      return f" {c} is an old city. {c} lies in the country of {nm(rng.choice(countries))}."
    question = f"In which country was {nm(person)} born?"
    answers = (nm(country),)
    oracle = [f"{nm(person)} was born in {nm(city)}.",
              f"{nm(person)} was born in {nm(city)}, which lies in {nm(country)}."]
    start = ()
  return _Facts(needed, distractor, question, answers, oracle,
                {"person": int(person), "city": int(city), "country": int(country)}, start)


_MAKERS = {"multihop": _multihop, "vartrack": _vartrack, "hotpot": _hotpot}


def make_example(config: TaskConfig, seed: int, index: int, tokenizer=None) -> Example:
  """Example `index` of the task with this seed; the same (config, seed, index) -> the same bytes.

  tokenizer: measures the text form's length (default: the byte-level tokenizer).
  """
  rng = np.random.default_rng([seed, index, _TASK_SALT[config.task]])
  vocab = SmallVocab(config.num_entities)
  if config.form == "text":
    tokenizer = tokenizer or ByteTokenizer()
    names = _names(np.random.default_rng([seed, _TASK_SALT[config.task]]), config.num_entities)
    words = [w for f in _FILLER for w in f.split(" ") if w]

    def filler(remaining: int) -> str:
      piece = str(rng.choice(_FILLER))
      if len(tokenizer.encode(piece)) <= remaining:
        return piece
      # The last filler: words, then " ." and at most single spaces, each while it adds tokens,
      # until the length is exact.  " ." is a pre-token of its own (dots after a segment's "."
      # were one pre-token across the cut), and a tokenizer that merges or drops runs of
      # spaces cannot keep the loop going: a piece that adds no token ends it.
      text = ""
      for word in words:
        if len(tokenizer.encode(text + " " + word)) > remaining:
          break
        text += " " + word
      for pad in (" .", " "):
        while len(tokenizer.encode(text)) < len(tokenizer.encode(text + pad)) <= remaining:
          text += pad
      return text or " "
  else:
    names = None
    # Fact-sized filler keeps facts aligned with the compressor's beacons (one per 4 tokens).
    filler = lambda remaining: (vocab["filler"],) * min(4, remaining)
  facts = _MAKERS[config.task](rng, config, vocab, names)
  segments, supporting = _fill(rng, facts, config, tokenizer, filler)
  return Example(id=f"{config.task}-{config.form}-{seed}-{index}", task=config.task,
                 segments=tuple(segments), supporting=tuple(supporting), question=facts.question,
                 answers=facts.answers, oracle_memory=tuple(facts.oracle),
                 oracle_start=facts.oracle_start,
                 metadata={**facts.metadata, "hops": config.hops, "seed": seed, "index": index,
                           "length": config.length, "form": config.form})


_TASK_SALT = {name: i + 1 for i, name in enumerate(TASKS)}


def initial_memory(config: TaskConfig) -> Piece:
  """The working memory before any chunk: `none` (ids) or the reference's phrase (text)."""
  return (SmallVocab(config.num_entities)["none"],) if config.form == "ids" else "No previous memory"
