"""Answer-accuracy metrics: the project's single source of EM, sub-EM and F1.

Published MemAgent RULER-HQA numbers (and LycheeMemory's, see
docs/architecture.md#evaluation-protocol) come from MemAgent's evaluation code
(taskutils/memory_eval/utils/__init__.py: `normalize_answer`,
`sub_exact_match_score`, `f1_score`; applied per question in
taskutils/memory_eval/ruler_hqa.py).  `sub_em` reproduces it so our numbers are
comparable, quirks included on purpose:

* An empty prediction (`""` or None: no answer could be extracted) scores 0 on
  every metric — the harness guards each score with `if item["pred"] else 0`.
* A response is stripped first, so one of only whitespace is empty (0); a non-empty
  prediction that normalises to nothing ("the", "?") scores sub-EM 1: the empty string is
  a substring of every gold answer.
* Containment is by characters, in either direction: "no" matches gold
  "Norway", and a prediction "Paris" matches gold "Paris Saint-Germain" too.
* Normalisation strips ASCII punctuation only (Python's `string.punctuation`)
  and keeps accents, so "–" (en-dash) vs "-" and "e" vs "é" differ.
* F1 is 0 when either normalised side is "yes", "no" or "noanswer" and the two
  differ.
* A response with `</think>` is scored on what follows its last one, or whole where
  nothing does.
* Where the prompt asks for the answer in `\\boxed{}` (MemAgent's final prompt), the
  box is the prediction, by the harness's rules (`last_boxed`: `\\boxed X` without braces
  too), and an answer without one is empty: 0 (`score_answer(..., boxed=True)`).
* Where it asks for "Therefore, the answer is ..." (the harness's "recurrent" final prompt),
  the prediction is what follows the last "the answer is" (`after_answer_is`), and an answer
  without the phrase is empty: 0 (`score_answer(..., answer_is=True)`).
  memrecall's own prompts ask for no box, and their answers are scored on the box's
  contents if they hold one, else the text.

Not reproduced: MemAgent scores only the first gold answer (`answers[0]`); we
take the maximum over all golds (the same for HotpotQA's single answer).  Its
per-question F1 is rounded to two decimals; ours is not.  Its harness drops
questions whose generation request failed from the mean; `score_batch` counts
every question given.

`strict_sub_em` is the honest companion reported beside it: an empty normalised
prediction is a miss and containment is on word boundaries.
"""

from __future__ import annotations

import collections
import math
import re
import string
from typing import Callable, NamedTuple, Sequence

Metric = Callable[[str | None, Sequence[str]], float]

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_CLOSED_ANSWERS = ("yes", "no", "noanswer")


def normalize(text: str) -> str:
  """SQuAD normalisation, in MemAgent's order: lower, punctuation, articles, spaces."""
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", text).split())


def _best(prediction: str | None, golds: Sequence[str], score: Callable[[str, str], float]) -> float:
  if isinstance(golds, str):
    raise TypeError(f"golds must be a sequence of answers, got the string {golds!r}")
  if not golds:
    raise ValueError("no gold answers to score against")
  if not prediction:  # MemAgent's `if item["pred"] else 0`
    return 0.0
  pred = normalize(prediction)
  return max(score(pred, normalize(gold)) for gold in golds)


def exact_match(prediction: str | None, golds: Sequence[str]) -> float:
  """1.0 when the normalised prediction equals a normalised gold answer."""
  return _best(prediction, golds, lambda p, g: float(p == g))


def sub_em(prediction: str | None, golds: Sequence[str]) -> float:
  """MemAgent-compatible sub-EM: character containment either way (see module doc)."""
  return _best(prediction, golds, lambda p, g: float(g in p or p in g))


def _contains_words(longer: list[str], shorter: list[str]) -> bool:
  n = len(shorter)
  return any(longer[i:i + n] == shorter for i in range(len(longer) - n + 1))


def _strict(pred: str, gold: str) -> float:
  if not pred or not gold:
    return 0.0
  p, g = pred.split(), gold.split()
  return float(_contains_words(p, g) or _contains_words(g, p))


def strict_sub_em(prediction: str | None, golds: Sequence[str]) -> float:
  """Sub-EM on whole words: "no" does not match "Norway"; an empty answer is a miss."""
  return _best(prediction, golds, _strict)


def _f1(pred: str, gold: str) -> float:
  if (pred in _CLOSED_ANSWERS or gold in _CLOSED_ANSWERS) and pred != gold:
    return 0.0
  p, g = pred.split(), gold.split()
  same = sum((collections.Counter(p) & collections.Counter(g)).values())
  if same == 0:
    return 0.0
  precision, recall = same / len(p), same / len(g)
  return 2 * precision * recall / (precision + recall)


def f1(prediction: str | None, golds: Sequence[str]) -> float:
  """SQuAD token F1 with MemAgent's yes/no/noanswer rule."""
  return _best(prediction, golds, _f1)


METRICS: dict[str, Metric] = {"em": exact_match, "sub_em": sub_em,
                              "strict_sub_em": strict_sub_em, "f1": f1}


ANSWER_METRICS = ("em", "sub_em", "strict_sub_em")
BOX = "\\boxed{"  # in a final prompt: it asks for the answer in a box
THINK_END = "</think>"
ANSWER_IS = "the answer is"  # in a final prompt ("Therefore, the answer is"): the answer follows
# What the harness strips from the end of such an answer: DeepSeek-R1's special tokens.
_R1_TOKENS = ("<\uff5cAssistant\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>")


def after_answer_is(text: str) -> str | None:
  """The answer MemAgent's harness extracts after "the answer is" (`extract_answer`), None
  where the phrase is missing: asterisks removed, the text after its last occurrence (case
  kept: "The answer is" does not count), DeepSeek-R1's special tokens and the periods at its
  ends stripped."""
  text = text.replace("*", "")
  if ANSWER_IS not in text:
    return None
  answer = text.rsplit(ANSWER_IS, 1)[-1].strip()
  for token in _R1_TOKENS:
    answer = answer.replace(token, "")
  return answer.strip().strip(".").strip()


def last_boxed(text: str) -> str | None:
  """The answer MemAgent's harness extracts from a box (`extract_boxed_answer`), None where it
  finds none.  Its rules, quirks included: if `\\boxed ` (a space, no brace) occurs anywhere,
  the text after its last occurrence up to the first `$`; otherwise the contents of the last
  `\\boxed{...}`, braces balanced; an unclosed box is None.  (Where the harness's asserts would
  raise, on `\\fbox{}` or `\\boxed` followed by neither a brace nor a space, this says None.)"""
  if "\\boxed " in text:
    return text.split("\\boxed ")[-1].split("$")[0]
  start = text.rfind("\\boxed")
  if start < 0 or not text.startswith(BOX, start):
    return None
  depth = 0
  for j in range(start, len(text)):
    depth += {"{": 1, "}": -1}.get(text[j], 0)
    if depth == 0 and text[j] == "}":
      return text[start + len(BOX):j]
  return None


def final_answer(prediction: str) -> str:
  """What MemAgent's harness scores of a response (`extract_solution`, then its fallback): the
  text after the last `</think>` where a reasoning model wrote one and something follows it,
  else the whole response."""
  tail = prediction.split(THINK_END)[-1].strip() if THINK_END in prediction else prediction
  return tail or prediction


def score_answer(prediction: str | None, golds: Sequence[str], boxed: bool = False,
                 answer_is: bool = False) -> dict[str, float]:
  """The one scoring of a decoded answer, for RL rewards and evaluation alike: EM, the
  MemAgent-compatible sub-EM and the strict sub-EM, each 0 or 1.  The text after a `</think>`
  is the answer, and an answer with a box (`last_boxed`) is scored on the box's contents.
  boxed: the prompt asked for the answer in a box (MemAgent's final prompt), so, as MemAgent's
  harness does, an answer without a closed box extracts nothing and scores 0 (its text is not
  scored instead).  answer_is: the prompt asked for "Therefore, the answer is ..." (the harness's
  "recurrent" prompt), so the answer is what `after_answer_is` extracts, boxes unread, and
  nothing where the phrase is missing."""
  prediction = final_answer(prediction.strip()) if prediction else prediction
  if answer_is:
    prediction = after_answer_is(prediction) if prediction else None
    return {name: METRICS[name](prediction, golds) for name in ANSWER_METRICS}
  box = last_boxed(prediction) if prediction else None
  prediction = box if box is not None or boxed else prediction
  return {name: METRICS[name](prediction, golds) for name in ANSWER_METRICS}


class Score(NamedTuple):
  mean: float    # × 100, as papers report
  stderr: float  # standard error of the mean × 100 (NaN for one question)


def score_batch(predictions: Sequence[str | None], golds_list: Sequence[Sequence[str]],
                metric: str | Metric = "sub_em") -> Score:
  """Mean × 100 and its standard error × 100 (sample std, n − 1) over questions."""
  if isinstance(metric, str):
    if metric not in METRICS:
      raise ValueError(f"unknown metric {metric!r}; expected one of {sorted(METRICS)}")
    metric = METRICS[metric]
  if len(predictions) != len(golds_list):
    raise ValueError(f"{len(predictions)} predictions for {len(golds_list)} questions")
  if not predictions:
    raise ValueError("no predictions to score")
  scores = [metric(p, g) for p, g in zip(predictions, golds_list)]
  n = len(scores)
  mean = sum(scores) / n
  if n < 2:
    return Score(100 * mean, float("nan"))
  variance = sum((s - mean) ** 2 for s in scores) / (n - 1)
  return Score(100 * mean, 100 * math.sqrt(variance / n))
