"""Prompt templates with `{question}` / `{memory}` slots, tokenised piece by piece.

A template is wrapped in the tokenizer's chat template, split at its slots,
and each literal piece is encoded on its own; question and memory *ids* are
spliced in between, never re-tokenised (docs/architecture.md#prompt-templates).
The result is a static, hashable `PromptTemplate` that renders batched prompts
inside jit.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import jax
import jax.numpy as jnp

from memrecall.models.tokenizer import Tokenizer

Array = jax.Array

# The released LycheeMemory model's prompts, verbatim (including the missing
# space in "memory.You" and the space after "<problem>").
UPDATE_TEMPLATE = (
    "\nThe above is a newly provided section, which may or may not contain information relevant "
    "to answering the problem. The previously summarized memory is stored within the "
    "<previous_memory> tags, and the problem is specified within the <problem> tags. Please read "
    "the provided section carefully and update the memory with any new information that helps "
    "address the problem. Be sure to retain all relevant details from the previous memory while "
    "incorporating any new, useful information.\n\n<problem> \n{question}\n</problem>\n\n"
    "<previous_memory>\n{memory}\n</previous_memory>\n\nUpdated memory:\n")
FINAL_TEMPLATE = (
    "You are presented with a problem and a previous memory.You do not need to update the memory, "
    "directly answer the problem based on the previous memory.\n\n<problem> \n{question}\n"
    "</problem>\n\n<memory>\n{memory}\n</memory>\n\nYour answer:\n")
# The gate is not in the released code; this is memrecall's default wording.
GATE_TEMPLATE = (
    "\nDoes the section above contain information needed to answer the problem, given the "
    "memory so far?\n\n<problem> \n{question}\n</problem>\n\n<memory>\n{memory}\n</memory>\n")
INITIAL_MEMORY = "No previous memory"
# Baselines on the same backbone: MemAgent's loop reads raw sections in its prompt
# (MemAgent's released prompt, word for word), and one-shot answering from a context.
MEMAGENT_TEMPLATE = (
    "You are presented with a problem, a section of an article that may contain the answer to the "
    "problem, and a previous memory. Please read the provided section carefully and update the "
    "memory with the new information that helps to answer the problem. Be sure to retain all "
    "relevant details from the previous memory while adding any new, useful information.\n\n"
    "<problem> \n{question}\n</problem>\n\n<memory>\n{memory}\n</memory>\n\n<section>\n"
    "{section}\n</section>\n\nUpdated memory:\n")
# MemAgent's final turn (its released recipe answers in \boxed{}; `metrics.score_answer` reads
# the box).  Used by configs/memagent.py and `launch/eval.py --prompts=memagent`.
MEMAGENT_FINAL_TEMPLATE = (
    "You are presented with a problem and a previous memory. Please answer the problem based on "
    "the previous memory and put the answer in \\boxed{}.\n\n<problem> \n{question}\n</problem>"
    "\n\n<memory>\n{memory}\n</memory>\n\nYour answer:\n")
# The final turn of MemAgent's evaluation harness ("recurrent", taskutils/memory_eval/utils/
# recurrent.py), with which its published RL-MemAgent numbers were made: the answer is read after
# its last "the answer is" (`metrics.after_answer_is`).  `launch/eval.py --prompts=memagent_recurrent`.
MEMAGENT_RECURRENT_FINAL_TEMPLATE = (
    "You are presented with a problem and a previous memory. Please answer the problem based on "
    "the previous memory and format your response as follows \"Therefore, the answer is (insert "
    "answer here)\".\n\n<problem> \n{question}\n</problem>\n\n<memory>\n{memory}\n</memory>\n\n"
    "Your answer:\n")
CONTEXT_TEMPLATE = (
    "Please read the following text and answer the question below.\n\n<text>\n{section}\n"
    "</text>\n\n<problem> \n{question}\n</problem>\n\nYour answer:\n")

# Qwen2.5's template, used when a checkpoint ships none.
QWEN2_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] "
    "+ '<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba "
    "Cloud. You are a helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- for message in messages "
    "%}{%- if not (message.role == 'system' and loop.first) %}{{- '<|im_start|>' + message.role + "
    "'\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}{%- if "
    "add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

SLOTS = ("question", "memory", "section")
_SLOT_PATTERN = re.compile(r"\{(" + "|".join(SLOTS) + r")\}")
_SENTINEL = "\x00MEMRECALL_MESSAGE\x00"


def wrap_in_chat(text: str, chat_template: str | None,
                 special_tokens: dict[str, str] | None = None) -> str:
  """`text` as the single user message of a chat, with the generation prompt appended.
  special_tokens: `bos_token` etc. as text, which templates may render (`Tokenizer`)."""
  if not chat_template:
    return text
  try:
    import jinja2
    import jinja2.sandbox
  except ImportError as e:
    raise ImportError("chat templates need jinja2: pip install 'memrecall[hf]'") from e

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  env.globals["raise_exception"] = raise_exception
  rendered = env.from_string(chat_template).render(
      messages=[{"role": "user", "content": _SENTINEL}], add_generation_prompt=True,
      **(special_tokens or {}))
  if rendered.count(_SENTINEL) != 1:
    raise ValueError("the chat template does not place the user message exactly once")
  return rendered.replace(_SENTINEL, text)


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
  """Literal pieces as token-id tuples, interleaved with slot names."""
  pieces: tuple[tuple[int, ...] | str, ...]

  @classmethod
  def build(cls, template: str, tokenizer: Tokenizer, chat_template: str | None = None
            ) -> "PromptTemplate":
    unknown = set(re.findall(r"\{(\w+)\}", template)) - set(SLOTS)
    if unknown:
      raise ValueError(f"template has unknown slots {sorted(unknown)}; allowed: {list(SLOTS)}")
    parts = _SLOT_PATTERN.split(wrap_in_chat(template, chat_template,
                                             tokenizer.special_tokens))
    pieces: list[tuple[int, ...] | str] = []
    for i, part in enumerate(parts):
      if i % 2:  # a slot name
        pieces.append(part)
      elif part:
        pieces.append(tuple(tokenizer.encode(part)))
    if not pieces or isinstance(pieces[-1], str):
      # The last token's logits start generation; a trailing slot could be empty.
      raise ValueError("a prompt template must end with literal text, not a slot")
    return cls(tuple(pieces))

  def length(self, question_len: int, memory_len: int, section_len: int = 0) -> int:
    """Rendered length [T] for slot buffers of the given sizes."""
    sizes = {"question": question_len, "memory": memory_len, "section": section_len}
    return sum(sizes[p] if isinstance(p, str) else len(p) for p in self.pieces)

  @property
  def literal_length(self) -> int:
    return self.length(0, 0)

  def render(self, question: Array, question_mask: Array, memory: Array, memory_mask: Array,
             section: Array | None = None, section_mask: Array | None = None
             ) -> tuple[Array, Array]:
    """Batched prompt ids and mask [B, T].

    Slot buffers may hold padding anywhere; it stays in place as masked holes,
    which attention and positions (counted over real tokens) both ignore.
    """
    batch = question.shape[0]
    slots = {"question": (question, question_mask), "memory": (memory, memory_mask),
             "section": (section, section_mask)}
    if "section" in self.pieces and section is None:
      raise ValueError("this template has a {section} slot: pass section ids")
    ids, masks = [], []
    for piece in self.pieces:
      if isinstance(piece, str):
        piece_ids, piece_mask = slots[piece]
      else:
        piece_ids = jnp.broadcast_to(jnp.asarray(piece, jnp.int32), (batch, len(piece)))
        piece_mask = jnp.ones((batch, len(piece)), bool)
      ids.append(piece_ids.astype(jnp.int32))
      masks.append(piece_mask.astype(bool))
    return jnp.concatenate(ids, axis=1), jnp.concatenate(masks, axis=1)


@dataclasses.dataclass(frozen=True)
class Prompts:
  """Everything the recall loop says to the model, tokenised once."""
  update: PromptTemplate
  final: PromptTemplate
  gate: PromptTemplate
  initial_memory: tuple[int, ...]
  memagent: PromptTemplate  # baseline: memory update from a raw section
  context: PromptTemplate  # baselines: one answer from (retrieved or truncated) raw text

  @classmethod
  def build(cls, tokenizer: Tokenizer, chat_template: str | None = QWEN2_CHAT_TEMPLATE, *,
            update_template: str = UPDATE_TEMPLATE, final_template: str = FINAL_TEMPLATE,
            gate_template: str = GATE_TEMPLATE,
            initial_memory: str | Sequence[int] = INITIAL_MEMORY,
            memagent_template: str = MEMAGENT_TEMPLATE,
            context_template: str = CONTEXT_TEMPLATE) -> "Prompts":
    """initial_memory: text, or token ids (tasks with their own vocabulary)."""
    ids = tokenizer.encode(initial_memory) if isinstance(initial_memory, str) else initial_memory
    build = lambda t: PromptTemplate.build(t, tokenizer, chat_template)
    return cls(update=build(update_template), final=build(final_template),
               gate=build(gate_template), initial_memory=tuple(int(i) for i in ids),
               memagent=build(memagent_template), context=build(context_template))


def pad_ids(rows: Sequence[Sequence[int]], length: int | None = None, pad_id: int = 0
            ) -> tuple[Array, Array]:
  """Right-pads id lists into ids and mask [B, length]."""
  length = max(len(r) for r in rows) if length is None else length
  if any(len(r) > length for r in rows):
    raise ValueError(f"a row of {max(len(r) for r in rows)} ids exceeds the budget of {length}")
  ids = [list(r) + [pad_id] * (length - len(r)) for r in rows]
  mask = [[True] * len(r) + [False] * (length - len(r)) for r in rows]
  return jnp.asarray(ids, jnp.int32).reshape(len(rows), length), jnp.asarray(mask, bool).reshape(
      len(rows), length)
