"""Qwen2's pre-tokenizer, for checking where segment cuts fall in the data's text.

A byte-level BPE merges only inside a pre-token, so text cut between segments tokenises as the
whole text does exactly when every cut is a break between the whole text's pre-tokens.
"""

# Qwen2's pre-tokenizer pattern (its tokenizer.json's Split).
QWEN2_PRE_TOKENS = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def qwen2_pieces(text: str) -> list[str]:
  from tokenizers import Regex, pre_tokenizers  # pylint: disable=g-import-not-at-top
  split = pre_tokenizers.Split(Regex(QWEN2_PRE_TOKENS), behavior="isolated")
  return [piece for piece, _ in split.pre_tokenize_str(text)]


def cuts_keep_pre_tokens(segments) -> bool:
  """Whether tokenising `segments` one by one gives the whole text's pre-tokens."""
  return [p for s in segments for p in qwen2_pieces(s)] == qwen2_pieces("".join(segments))
