r"""Answers a question about a long document with compressed memory.

  python launch/answer.py --hf_checkpoint=/path/to/LycheeMemory-7B \
      --document=book.txt --question="Who wrote the letter?" --mode=all
  python launch/answer.py --hf_checkpoint=ckpt --document=eval_50.json --row=3 \
      --memory_bank=/tmp/bank_row3 --output_json=/tmp/answer.json

The document is compressed once (saved to --memory_bank if given, reused when
it is already there and fits the model and the document); the recall loop then
walks its chunks, gating, rewriting the working memory, and answers.  A bank
made from another document is refused, naming both; --recompile_bank rebuilds
it from this one.  The weights go on the run's mesh (--mesh, default the run's:
every device on fsdp for a HF checkpoint) as --weights says: a whole copy on each
device when it takes at most a third of one, else split over heads and MLP columns
on as few devices as hold a third each (the mesh re-formed as data x tensor), else
sharded by training's rules, so a model larger than one device is answered with;
the document's chunks are compressed split over the mesh's batch axes.  Sizes are
positive (leave a flag out for its default); errors are one line, --verbose shows
tracebacks.
"""

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_HF_CHECKPOINT = flags.DEFINE_string("hf_checkpoint", None, "HF LycheeMemory/Qwen2 checkpoint.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "Or the workdir of a memrecall training run (orbax; its "
                                  "latest checkpoint), or one checkpoint's folder "
                                  "WORKDIR/checkpoints/STEP.")
_DOCUMENT = flags.DEFINE_string(
    "document", None, "Plain text; a JSON list of token ids; or question rows (.json, .jsonl, "
    ".parquet) in MemAgent's RL layout (context, prompt, reward_model, extra_info.question) or "
    "its evaluation layout (context, input, answers); see --row.")
_ROW = flags.DEFINE_integer("row", 0, "Row of a JSON rows document.", lower_bound=0)
_QUESTION = flags.DEFINE_string("question", None, "Question text (default: the row's question).")
_QUESTION_IDS = flags.DEFINE_list("question_ids", None, "Question token ids, e.g. 1,2,3.")
_MAX_QUESTION_TOKENS = flags.DEFINE_integer("max_question_tokens", 1024, "Question budget.",
                                            lower_bound=1)
_CHUNK_SIZE = flags.DEFINE_integer("chunk_size", None,
                                   "Tokens per chunk (default: the run's own or an export's; two "
                                   "compressor windows for another HF checkpoint).", lower_bound=1)
_MEMORY_SIZE = flags.DEFINE_integer(
    "memory_size", None, "Max new tokens per memory update (default: the run's or an export's; "
    "1024 for another HF checkpoint).",
    lower_bound=1)
_MAX_NEW_TOKENS = flags.DEFINE_integer(
    "max_new_tokens", None, "Max tokens of the answer (default: the run's or an export's; 1024 "
    "for another HF checkpoint).",
    lower_bound=1)
_MEMORY_BANK = flags.DEFINE_string("memory_bank", None, "Reuse the bank here if present, else save.")
_RECOMPILE_BANK = flags.DEFINE_bool(
    "recompile_bank", False, "Rebuild --memory_bank from this document even when it holds another "
    "document's bank (which is otherwise refused).")
_MODE = flags.DEFINE_enum("mode", None, ["gate", "all", "topk"],
                          "Block selection (default: gate if the model has a gate, else all).")
_THRESHOLD = flags.DEFINE_float("threshold", None, "Gate probability needed to read a block "
                                "(default: the run's own gate.threshold or an export's; 0.5 "
                                "for another HF checkpoint).", lower_bound=0.0, upper_bound=1.0)
_TOPK = flags.DEFINE_integer("topk", 4, "Blocks read per question in topk mode.", lower_bound=1)
_GROUP_SIZE = flags.DEFINE_integer("group_size", 8, "Chunks per device transfer / streaming step.",
                                   lower_bound=1)
_GATE_GROUP = flags.DEFINE_integer(
    "gate_group", 16, "gate mode: blocks scored per step against the current memory (the same "
    "decisions in fewer sequential steps).", lower_bound=1)
_STREAM = flags.DEFINE_bool("stream", False,
                            "Compress inside the loop group by group (flat device memory).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.", lower_bound=0.0)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Where to write answer and trace.")
# --verbose and one-line errors; --gate_lora_rank, --matmul_precision
from launch import cli, model_flags  # noqa: E402
flags.adopt_module_key_flags(cli)  # its flags in --help
flags.adopt_module_key_flags(model_flags)


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np

  from memrecall import readers, run_builder
  from memrecall.data import documents
  from memrecall.evaluate import evaluator, traces
  from memrecall.method import gate, memory_bank, prompts, recall
  from memrecall.runtime import checkpoint, fingerprint, progress

  if (_HF_CHECKPOINT.value is None) == (_CHECKPOINT.value is None) or not _DOCUMENT.value:
    raise app.UsageError("--document and exactly one of --hf_checkpoint and --checkpoint are "
                         "required")
  cli.readable("hf_checkpoint", _HF_CHECKPOINT.value)
  cli.readable("checkpoint", _CHECKPOINT.value)
  cli.readable("document", _DOCUMENT.value)
  cli.writable("output_json", _OUTPUT_JSON.value)
  cli.writable("memory_bank", _MEMORY_BANK.value, directory=True)
  if _STREAM.value and _MEMORY_BANK.value:
    raise app.UsageError("--stream compresses on the fly; it does not use --memory_bank")
  model_flags.mesh_shape()  # a malformed --mesh: an error before anything is read
  if _QUESTION.value is not None and _QUESTION_IDS.value is not None:
    raise app.UsageError("give at most one of --question and --question_ids")
  if flags.FLAGS["row"].present and not documents.row_file_kind(_DOCUMENT.value):
    raise app.UsageError(f"--row picks a row of a {'/'.join(documents.ROW_FILES)} document; "
                         f"{_DOCUMENT.value} is read whole")
  try:
    given_ids = [int(i) for i in _QUESTION_IDS.value or []]
  except ValueError:
    raise app.UsageError(f"--question_ids must be integers, got {','.join(_QUESTION_IDS.value)}"
                         ) from None
  document = documents.read_document(_DOCUMENT.value, _ROW.value)
  source = _DOCUMENT.value + (f" row {_ROW.value}" if documents.row_file_kind(_DOCUMENT.value)
                              and document.ids is None else "")
  document_hash = fingerprint.value_hash({"text": document.text, "ids": document.ids})
  bank_dir = _MEMORY_BANK.value
  if bank_dir:
    try:  # before any model is loaded: a bank replaces its whole directory
      memory_bank.check_replaceable(bank_dir)
    except FileExistsError as e:
      raise app.UsageError(f"--memory_bank: {e}") from None
  reuse_bank = bool(bank_dir) and os.path.exists(os.path.join(bank_dir, "metadata.json")) \
      and not _RECOMPILE_BANK.value
  if reuse_bank:
    try:  # before any model is loaded
      memory_bank.check_document(bank_dir, document_hash, source)
    except memory_bank.BankMismatchError as e:
      raise app.UsageError(f"{e}: pass --recompile_bank to rebuild it from this document, or "
                           "another --memory_bank") from None
  settings = dict(chunk_size=_CHUNK_SIZE.value, memory_size=_MEMORY_SIZE.value,
                  answer_tokens=_MAX_NEW_TOKENS.value)
  # The run's mesh: --mesh or the run's shape where it fits this machine's devices.
  if _CHECKPOINT.value:
    # Before any weight is read (a HF checkpoint always gets a compressor).
    saved, _ = checkpoint.load_config(*checkpoint.step_folder(_CHECKPOINT.value, None))
    if saved.get("agent") == "memagent" or not saved.get("model", {}).get("compressor", True):
      raise app.UsageError("this run reads raw chunks (a MemAgent baseline's): answer.py reads "
                           "compressed ones; evaluate it with eval.py --modes=memagent")
    run, params = model_flags.on_own_devices(lambda mesh: run_builder.from_workdir(
        _CHECKPOINT.value, matmul_precision=model_flags.MATMUL_PRECISION.value, mesh=mesh,
        **settings), len(jax.local_devices()))
  else:
    run = model_flags.on_own_devices(lambda mesh: run_builder.from_hf_checkpoint(
        _HF_CHECKPOINT.value, model=model_flags.hf_model_settings(), mesh=mesh,
        **{k: v for k, v in settings.items() if v}), len(jax.local_devices()))
  tok, config = run.tokenizer, run.model
  mode = _MODE.value or ("gate" if config.has_gate else "all")
  if mode in gate.GATE_SCORED_MODES and not config.has_gate:
    raise app.UsageError(f"--mode={mode} needs a gate: this checkpoint has none "
                         "(use --mode=all, or a checkpoint trained with a gate)")
  if given_ids:
    question_ids = given_ids
  else:
    text = _QUESTION.value or document.question
    if not text:
      raise app.UsageError("no question: pass --question or a document row with one")
    question_ids = tok.encode(text)
  if not question_ids:
    raise app.UsageError("the question is empty")
  if len(question_ids) > _MAX_QUESTION_TOKENS.value:
    raise app.UsageError(f"the question has {len(question_ids)} tokens, over the budget of "
                         f"{_MAX_QUESTION_TOKENS.value} (--max_question_tokens)")
  doc_ids = list(document.ids) if document.ids is not None else tok.encode(document.text)
  bad = [i for i in doc_ids + question_ids if not 0 <= i < config.vocab_size]
  if bad:
    raise app.UsageError(f"token ids {bad[:5]} are outside the vocabulary ({config.vocab_size})")
  if _HF_CHECKPOINT.value:
    params = run.params()  # the weights last: every check above is cheap
  gate.warn_if_untrained(params, [mode])
  setup = run.recall_setup(mode, threshold=_THRESHOLD.value, topk=_TOPK.value,
                           group_size=_GROUP_SIZE.value, gate_group=_GATE_GROUP.value,
                           temperature=_TEMPERATURE.value)
  # Per-layer weights for the loop's decode steps, on the run's mesh as --weights says (the
  # bank's fingerprint stays the stored tree's).  The method's reader in `mode`,
  # its blocks compressed inside the loop (--stream) or banked in host memory.
  layer_params, setup, mesh = evaluator.on_mesh(
      params, setup, run.mesh, model_flags.WEIGHTS.value,
      log=lambda line: print(line, file=sys.stderr))
  reader = readers.get(mode, setup, run.compressor,
                       placement="stream" if _STREAM.value else "host")
  settings = run.compressor
  chunk_ids, chunk_mask = reader.chunk_document(doc_ids)
  print(f"document: {len(doc_ids)} tokens -> {chunk_ids.shape[0]} chunks of {settings.chunk_size}",
        file=sys.stderr)
  question, question_mask = prompts.pad_ids([question_ids])
  rng = jax.random.key(_SEED.value)
  n_blocks = chunk_ids.shape[0]
  with jax.set_mesh(mesh):
    if _STREAM.value:
      ids, mask = reader.chunk_major(chunk_ids[None], chunk_mask[None])  # whole groups
      out = reader.read(layer_params, (jnp.asarray(ids), jnp.asarray(mask), question,
                                       question_mask), rng)
    else:
      tokens_hash = fingerprint.value_hash(doc_ids)
      if reuse_bank:
        expected = memory_bank.BankMetadata(
            model_fingerprint=memory_bank.model_fingerprint(params, config),
            chunk_size=settings.chunk_size, window=settings.window, ratio=settings.ratio,
            dtype=config.dtype, num_chunks=chunk_ids.shape[0], num_tokens=len(doc_ids),
            document_hash=document_hash, tokens_hash=tokens_hash, document=source)
        try:
          bank, _ = memory_bank.load_bank(bank_dir, expected)
        except memory_bank.BankMismatchError as e:
          raise app.UsageError(f"{e}: pass --recompile_bank to rebuild it with these settings, "
                               "or another --memory_bank") from None
        print(f"reusing memory bank {bank_dir}", file=sys.stderr)
      else:  # the document's chunks split over the mesh's batch axes
        memory = reader.compress(layer_params, chunk_ids, chunk_mask, mesh)
        if bank_dir:
          memory_bank.save_bank(bank_dir, memory, memory_bank.describe(
              params, config, settings, memory, len(doc_ids), document_hash=document_hash,
              tokens_hash=tokens_hash, document=source))
          print(f"saved memory bank {bank_dir}", file=sys.stderr)
        bank = jax.tree.map(np.asarray, recall.DocumentBank.from_chunks([memory]))
      n_blocks = bank.num_blocks
      out = reader.read(layer_params, (bank, question, question_mask), rng,
                        progress=progress.Progress(n_blocks, "chunks"))

  n = int(out.answer.lengths[0])
  answer_ids = [int(i) for i in out.answer.tokens[0, :n] if int(i) not in config.eos_token_ids]
  trace = traces.block_records(out.trace, 0, n_blocks, decode=run.decode)
  answer = run.decode(answer_ids)
  for row in trace:
    score = "   -  " if row["gate_score"] is None else f"{row['gate_score']:.3f}"
    flag = "read" if row["read"] else "skip"
    print(f"chunk {row['chunk']:5d}  gate {score}  {flag}  memory: {row['memory'][:80]!r}")
  print(f"answer: {answer}")
  if _OUTPUT_JSON.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT_JSON.value)), exist_ok=True)
    with open(_OUTPUT_JSON.value, "w", encoding="utf-8") as f:
      json.dump({"answer_ids": answer_ids, "answer": answer, "mode": mode, "trace": trace}, f,
                ensure_ascii=False, indent=1)


if __name__ == "__main__":
  cli.run(main)
