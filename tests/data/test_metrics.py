"""Metrics on hand-computed cases, including the MemAgent quirks we reproduce on purpose."""

import math

import pytest

from memrecall.data import metrics
from memrecall.data.metrics import exact_match, f1, normalize, score_batch, strict_sub_em, sub_em


@pytest.mark.parametrize("text, expected", [
    ("The  Quick, Brown-Fox!", "quick brownfox"),
    ("An apple a day", "apple day"),
    ("theatre", "theatre"),
    ("the-end", "theend"),                        # punctuation goes before articles
    ("Zürich – Genève", "zürich – genève"),       # accents and en-dash are kept
    ("«the» “Beatles”", "« » “beatles”"),         # only ASCII punctuation is stripped
    ("  \t\n", ""),
    ("The", ""),
])
def test_normalize(text, expected):
  assert normalize(text) == expected


# (prediction, golds, em, sub_em, strict_sub_em), all worked out by hand.
CASES = [
    ("Paris", ["paris"], 1, 1, 1),
    ("The Eiffel Tower.", ["eiffel tower"], 1, 1, 1),
    ("an Apple", ["APPLE"], 1, 1, 1),
    ("Eiffel", ["Eiffel Tower"], 0, 1, 1),
    ("Paris, France", ["Paris"], 0, 1, 1),
    ("Paris", ["Paris Saint-Germain"], 0, 1, 1),
    ("New York City", ["York"], 0, 1, 1),
    ("the United States", ["United States of America"], 0, 1, 1),
    ("states united", ["united states"], 0, 0, 0),
    ("no", ["Norway"], 0, 1, 0),                  # character containment
    ("Norway", ["no"], 0, 1, 0),
    ("Yorkshire", ["York"], 0, 1, 0),
    ("Theodore", ["Theo"], 0, 1, 0),
    ("the end", ["the-end"], 0, 1, 0),            # "end" inside "theend"
    ("yes", ["no"], 0, 0, 0),
    ("1990–1995", ["1990-1995"], 0, 0, 0),        # en-dash kept, hyphen stripped
    ("Zurich", ["Zürich"], 0, 0, 0),
    ("São Paulo", ["Sao Paulo"], 0, 0, 0),
    ("the", ["Norway"], 0, 1, 0),                 # normalises to "": in every gold
    ("   ", ["Norway"], 0, 1, 0),
    ("?!", ["Norway"], 0, 1, 0),
    ("a", ["an"], 1, 1, 0),                       # both sides normalise to ""
    ("", ["Norway"], 0, 0, 0),                    # the harness scores an empty answer 0
    (None, ["Norway"], 0, 0, 0),
    ("cat", ["dog", "a cat"], 1, 1, 1),           # max over golds
    ("dog", ["bird", "cat"], 0, 0, 0),
]


@pytest.mark.parametrize("prediction, golds, em, sub, strict", CASES)
def test_match_metrics(prediction, golds, em, sub, strict):
  assert exact_match(prediction, golds) == em
  assert sub_em(prediction, golds) == sub
  assert strict_sub_em(prediction, golds) == strict


@pytest.mark.parametrize("prediction, golds, expected", [
    ("the cat sat", ["cat sat down"], 0.8),       # p = 1, r = 2/3
    ("a b c d", ["b e"], 0.4),                    # [b c d] vs [b e]: p = 1/3, r = 1/2
    ("cat cat", ["cat"], 2 / 3),                  # repeated tokens count once per gold token
    ("Paris", ["London"], 0.0),
    ("yes", ["yes"], 1.0),
    ("noanswer", ["noanswer"], 1.0),
    ("yes", ["no"], 0.0),
    ("no", ["Norway"], 0.0),
    ("yes it is", ["yes"], 0.0),                  # a closed gold needs the exact answer
    ("no sir", ["no sir"], 1.0),
    ("the", ["the"], 0.0),                        # nothing left to share
    ("", ["Paris"], 0.0),
    ("Paris", ["London", "the paris"], 1.0),
])
def test_f1(prediction, golds, expected):
  assert f1(prediction, golds) == pytest.approx(expected)


def test_golds_must_be_a_sequence():
  with pytest.raises(TypeError, match="sequence"):
    sub_em("Paris", "Paris")
  with pytest.raises(ValueError, match="no gold"):
    sub_em("Paris", [])


def test_score_batch_mean_and_standard_error():
  predictions = ["Paris", "no", "", "London"]
  golds = [["Paris"], ["Norway"], ["Rome"], ["Berlin"]]
  # sub-EM [1, 1, 0, 0]: sample variance 1/3, standard error sqrt(1/12).
  mean, stderr = score_batch(predictions, golds, "sub_em")
  assert mean == pytest.approx(50.0)
  assert stderr == pytest.approx(100 * math.sqrt(1 / 12))
  # strict [1, 0, 0, 0]: sample variance 0.25, standard error 0.25.
  assert score_batch(predictions, golds, strict_sub_em) == pytest.approx((25.0, 25.0))
  assert score_batch(predictions, golds, "em").mean == pytest.approx(25.0)


def test_score_batch_edges():
  one = score_batch(["Paris"], [["Paris"]])
  assert one.mean == 100.0 and math.isnan(one.stderr)
  assert score_batch(["x", "y"], [["x"], ["x"]], "f1") == pytest.approx((50.0, 50.0))
  with pytest.raises(ValueError, match="2 predictions for 1"):
    score_batch(["a", "b"], [["a"]])
  with pytest.raises(ValueError, match="no predictions"):
    score_batch([], [])
  with pytest.raises(ValueError, match="unknown metric"):
    score_batch(["a"], [["a"]], "accuracy")
  assert set(metrics.METRICS) == {"em", "sub_em", "strict_sub_em", "f1"}


def test_score_answer_reads_the_last_box_and_reports_every_form():
  from memrecall.data.metrics import last_boxed, score_answer
  assert last_boxed(r"so \boxed{a} then \boxed{Paris {city}}") == "Paris {city}"
  assert last_boxed(r"\boxed{open") is None and last_boxed("plain") is None
  assert score_answer(r"The answer is \boxed{Paris}.", ["Paris"]) == {
      "em": 1.0, "sub_em": 1.0, "strict_sub_em": 1.0}
  # MemAgent's compatible sub-EM pays for an answer that normalises to nothing; strict does not.
  assert score_answer("the", ["Paris"]) == {"em": 0.0, "sub_em": 1.0, "strict_sub_em": 0.0}
  assert score_answer("no", ["Norway"]) == {"em": 0.0, "sub_em": 1.0, "strict_sub_em": 0.0}
  # Asked for a box (MemAgent's prompt), an answer without a closed one extracts nothing, as
  # MemAgent's harness scores it: 0, though its text holds the gold; not asked, the text counts.
  zero = {"em": 0.0, "sub_em": 0.0, "strict_sub_em": 0.0}
  for text in ("The director was Christopher Nolan.", r"So \boxed{Christopher Nolan"):
    assert score_answer(text, ["Christopher Nolan"], boxed=True) == zero
    assert score_answer(text, ["Christopher Nolan"])["sub_em"] == 1.0
  assert score_answer(r"\boxed{Christopher Nolan}", ["Christopher Nolan"], boxed=True)["em"] == 1


@pytest.mark.parametrize("text, expected", [
    # MemAgent's `extract_boxed_answer`, quirks included (taskutils/memory_eval/utils).
    (r"So \boxed Paris$ indeed", "Paris"),               # no braces: up to the first `$`
    (r"\boxed{A} then \boxed B", "B"),
    (r"\boxed B then \boxed{A}", r"B then \boxed{A}"),    # a spaced box anywhere wins
    (r"\boxed{A} and a bare \boxed", None),              # the last `\boxed` opens no brace
    (r"\fbox{A}", None),                                 # the harness's assert would raise
    (r"\boxed{a {b} c} d}", "a {b} c"),
])
def test_last_boxed_follows_memagents_harness(text, expected):
  from memrecall.data.metrics import last_boxed
  assert last_boxed(text) == expected


def test_a_reasoning_models_answer_is_what_follows_its_last_think_end():
  from memrecall.data.metrics import score_answer
  # The box inside the reasoning is not the answer; the text after `</think>` is.
  assert score_answer(r"<think>\boxed{Paris}?</think> London", ["London"])["em"] == 1.0
  assert score_answer(r"<think>\boxed{Paris}?</think> London", ["Paris"])["sub_em"] == 0.0
  assert score_answer(r"<think>x</think>a</think> \boxed{Rome}", ["Rome"], boxed=True)["em"] == 1


def test_a_response_is_stripped_and_scored_whole_where_nothing_follows_think_end():
  """MemAgent's harness strips the response, and where nothing follows `</think>` scores the
  whole response (`extract_answer(pred) if pred else extract_answer(response)`)."""
  from memrecall.data.metrics import score_answer
  zero = {"em": 0.0, "sub_em": 0.0, "strict_sub_em": 0.0}
  for blank in ("\n", "  \n ", "\t"):
    assert score_answer(blank, ["Norway"]) == zero  # sub-EM 1 before: "" is in every gold
  assert score_answer("\\boxed \n", ["Norway"], boxed=True) == zero
  assert score_answer(r"<think>so \boxed{Paris}</think>", ["Paris"], boxed=True)["em"] == 1.0
  assert score_answer("<think>so \\boxed{Paris}</think> \n", ["Paris"], boxed=True)["em"] == 1.0
  # Something after `</think>` is still the answer, box or not.
  assert score_answer(r"<think>\boxed{Paris}</think> London", ["Paris"], boxed=True) == zero


@pytest.mark.parametrize("text, expected", [
    # MemAgent's `extract_answer` for its "recurrent" final prompt (taskutils/memory_eval/utils):
    ("Therefore, the answer is Paris.", "Paris"),
    ("**Therefore, the answer is Paris**.", "Paris"),                 # asterisks removed first
    ("the answer is yes. On reflection the answer is no.", "no"),     # the last occurrence
    ("The answer is Paris.", None),                                   # case kept: no phrase
    ("Paris", None),
    ("the answer is Paris<\uff5cend\u2581of\u2581sentence\uff5c>", "Paris"),  # R1's tokens
    ("the answer is ...Paris..", "Paris"),                            # periods at both ends
    ("the answer is", ""),
])
def test_after_answer_is_follows_memagents_harness(text, expected):
  assert metrics.after_answer_is(text) == expected


def test_the_recurrent_prompts_answer_is_scored_after_the_phrase_alone():
  """MemAgent's evaluation prompt asks for "Therefore, the answer is ...": what follows the
  phrase is scored, boxes are not read, and an answer without it scores 0 (its harness scores
  a None prediction 0), also after `</think>`."""
  zero = {"em": 0.0, "sub_em": 0.0, "strict_sub_em": 0.0}
  score = lambda text, gold: metrics.score_answer(text, [gold], answer_is=True)
  assert score("We read it. Therefore, the answer is Oslo.", "Oslo")["em"] == 1.0
  assert score("Oslo", "Oslo") == zero
  assert score(r"\boxed{Oslo}", "Oslo") == zero
  assert score("Therefore, the answer is .", "Oslo") == zero  # empty after stripping
  assert score("<think>the answer is Rome</think>Therefore, the answer is Oslo", "Oslo")["em"] == 1
