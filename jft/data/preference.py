"""Data for alignment training: instructions, preference pairs, unpaired feedback, reward pairs.

Layouts read (JSON list or JSONL, see `load_json_rows`):

    instruction   Alpaca's instruction/input/output      -> {"prompt", "response"}
    preference    (a) prompt/chosen/rejected strings      -> {"prompt", "chosen", "rejected"}
                  (b) TRL's conversational layout: prompt = [{role, content}, ...],
                      chosen/rejected = [{role: assistant, content}]
                  (c) ShareGPT / LLaMA-Factory: conversations = [{from: human|gpt|system, value}],
                      chosen/rejected = {from: gpt, value}
    unpaired      any preference layout (chosen -> desirable, rejected -> undesirable),
                  or TRL's prompt/completion/label    -> {"prompt", "completion", "desirable"}
    reward        text/score rows of data/sentiment    -> {"chosen", "rejected", "margin", ...}

A prompt becomes one string: the model's chat template (whole conversations,
ending with the generation prompt) or a plain `template` with {text}. Then
`tokenize_pairs` / `tokenize_unpaired` turn strings into int32 ids (completions
end with eos; a prompt that is too long is cut, never a completion) and
`pad_pairs` / `pad_unpaired` collate rows into batches.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple, Optional, Sequence

import numpy as np

from jft.data import DataError, cut_prompt, held_out, jsonl_rows, read_text, render_prompt, response_ids, text_of

ALPACA_PROMPT = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n"
                       "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
BUCKETS = (">=2", "1-2 same polarity", "1-2 opposite polarity", "<1")


# ---------------------------------------------------------------------------- files


def load_json_rows(path: str) -> list[dict]:
  """The rows of a .json file (a list of objects) or a .jsonl file (one object a line)."""
  path = str(path)
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such file")
  ext = os.path.splitext(path)[1]
  if ext not in (".json", ".jsonl"):
    raise DataError(f"{path}: expected a .json or .jsonl file")
  text = read_text(path)
  if not text.strip():
    raise DataError(f"{path}: the file is empty (no rows)")
  if ext == ".jsonl":
    return jsonl_rows(path, text)
  try:
    rows = json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
  if not isinstance(rows, list):
    raise DataError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
  if not rows:
    raise DataError(f"{path}: the file is empty (no rows)")
  for i, row in enumerate(rows):
    if not isinstance(row, dict):
      raise DataError(f"{path}: row {i} is a {type(row).__name__}, not an object")
  return rows


# ---------------------------------------------------------------------------- instructions


def instruction_examples(rows, tokenizer, *, template: str = "alpaca", limit: Optional[int] = None,
                         system: str = "", where: str = "instruction data") -> list[dict]:
  """Alpaca rows -> [{"prompt", "response"}].

  template="alpaca": the Stanford Alpaca prompt (the variant with "### Input:"
  when `input` is non-empty); "chat": the model's chat template, the user
  message being the instruction, a blank line and the input.
  """
  if template not in ("alpaca", "chat"):
    raise DataError(f"{where}: template must be 'alpaca' or 'chat', got {template!r}")
  out = []
  for i, row in enumerate(rows):
    if limit is not None and i >= limit:
      break
    missing = [k for k in ("instruction", "output") if k not in row]
    if missing:
      raise DataError(f"{where}: row {i} has no {' or '.join(map(repr, missing))}; fields: {sorted(row)}")
    instruction, inp, output = (text_of(row, "instruction", where, i), text_of(row, "input", where, i, ""),
                                text_of(row, "output", where, i))
    if not output.strip():
      raise DataError(f"{where}: row {i} has an empty output")
    if template == "alpaca":
      prompt = (ALPACA_PROMPT_INPUT if inp.strip() else ALPACA_PROMPT).format(instruction=instruction, input=inp)
    else:
      user = instruction + "\n\n" + inp if inp.strip() else instruction
      prompt = render_prompt(tokenizer, user, "{text}", True, system)
    out.append({"prompt": prompt, "response": output})
  return out


# ---------------------------------------------------------------------------- preference pairs


def _messages(turns, i: int, where: str) -> list[dict]:
  """TRL {role, content} or ShareGPT {from, value} turns -> [{role, content}]."""
  if not isinstance(turns, list) or not turns:
    raise DataError(f"{where}: row {i}: the conversation must be a non-empty list of messages")
  out = []
  for turn in turns:
    if isinstance(turn, dict) and "role" in turn and "content" in turn:
      role, content = turn["role"], turn["content"]
    elif isinstance(turn, dict) and "from" in turn and "value" in turn:
      role, content = SHAREGPT_ROLES.get(turn["from"], turn["from"]), turn["value"]
    else:
      raise DataError(f"{where}: row {i}: a message needs role/content or from/value; got {turn!r:.80}")
    if role not in ("system", "user", "assistant"):
      raise DataError(f"{where}: row {i}: unsupported role {role!r} (have system, user/human, assistant/gpt)")
    out.append({"role": role, "content": text_of({"content": content}, "content", where, i)})
  if out[-1]["role"] != "user":
    raise DataError(f"{where}: row {i}: the conversation must end with a user message, "
                    f"not {out[-1]['role']!r}")
  return out


def _render(tokenizer, prompt, i: int, *, chat: bool, template: str, system: str, where: str) -> str:
  """A string prompt or a conversation -> the prompt string.

  `template` formats the last user message; a system message in the row wins
  over `system`. Without a chat template a single-turn conversation is plain
  text (its system message, if any, first and a blank line), and several turns
  are an error: there is no faithful way to flatten them.
  """
  if isinstance(prompt, str):
    return render_prompt(tokenizer, prompt, template, chat, system)
  messages = _messages(prompt, i, where)
  messages[-1] = {"role": "user", "content": template.format(text=messages[-1]["content"])}
  has_template = chat and getattr(tokenizer, "chat_template", None)
  if has_template:
    if system and messages[0]["role"] != "system":
      messages = [{"role": "system", "content": system}] + messages
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  if sum(m["role"] != "system" for m in messages) > 1:
    raise DataError(f"{where}: row {i}: a multi-turn conversation needs a chat template "
                    f"(chat=True and a tokenizer that has one)")
  return "\n\n".join(m["content"] for m in messages)


def _completion(value, i: int, name: str, where: str) -> str:
  """A completion: a string, TRL's [{role: assistant, content}] or ShareGPT's {from: gpt, value}."""
  if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
    value = value[0]
  if isinstance(value, dict):
    role = value.get("role", SHAREGPT_ROLES.get(value.get("from")))
    text = value.get("content", value.get("value"))
    if role != "assistant" or text is None:
      raise DataError(f"{where}: row {i}: {name} must be one assistant message (role/content or from: gpt/value); "
                      f"got {value!r:.80}")
    value = text
  if not isinstance(value, str):
    raise DataError(f"{where}: row {i}: {name} must be a string or one assistant message; got {value!r:.80}")
  if not value.strip():
    raise DataError(f"{where}: row {i}: empty {name} completion")
  return value


def _prompt_of(row: dict, i: int, where: str):
  if "conversations" in row:
    return row["conversations"]
  if "prompt" in row and isinstance(row["prompt"], (str, list)):
    return row["prompt"]
  raise DataError(f"{where}: row {i}: unknown layout (fields {sorted(row)}); expected prompt/chosen/rejected "
                  f"(strings or TRL messages) or conversations/chosen/rejected (ShareGPT)")


def _preference(row, i: int, tokenizer, *, chat: bool, template: str, system: str, where: str) -> dict:
  if not isinstance(row, dict):
    raise DataError(f"{where}: row {i} is a {type(row).__name__}, not an object")
  missing = [k for k in ("chosen", "rejected") if k not in row]
  if missing:
    raise DataError(f"{where}: row {i} has no {' or '.join(map(repr, missing))}; fields: {sorted(row)}")
  prompt = _render(tokenizer, _prompt_of(row, i, where), i, chat=chat, template=template, system=system, where=where)
  return {"prompt": prompt, "chosen": _completion(row["chosen"], i, "chosen", where),
          "rejected": _completion(row["rejected"], i, "rejected", where)}


def preference_examples(rows, tokenizer, *, chat: bool, template: str = "{text}", system: str = "",
                        where: str = "preference data") -> list[dict]:
  """Rows in any of the three preference layouts -> [{"prompt", "chosen", "rejected"}] (strings)."""
  return [_preference(row, i, tokenizer, chat=chat, template=template, system=system, where=where)
          for i, row in enumerate(rows)]


class PairRow(NamedTuple):
  prompt_ids: np.ndarray
  chosen_ids: np.ndarray
  rejected_ids: np.ndarray


def tokenize_pairs(examples, tokenizer, max_length: int, chat: bool,
                   truncation: str = "left") -> tuple[list[PairRow], int]:
  """-> (rows, number of prompts truncated).

  Both sequences share the prompt, cut (from the left by default, as
  `jft.data.tokenize` does) until prompt + the longer completion fits
  `max_length`; completions are never cut, so one that leaves no room for a
  prompt token is an error.
  """
  cut_prompt([], 0, truncation)  # a bad value is named before any row
  rows, truncated = [], 0
  for i, ex in enumerate(examples):
    prompt = tokenizer(ex["prompt"], add_special_tokens=not chat)["input_ids"]
    chosen = response_ids(tokenizer, ex["chosen"], chat)
    rejected = response_ids(tokenizer, ex["rejected"], chat)
    room = max_length - max(len(chosen), len(rejected))
    if room < 1:
      raise DataError(f"pair {i}: completions of {len(chosen)} (chosen) and {len(rejected)} (rejected) tokens "
                      f"leave no room for the prompt in max_length={max_length}")
    if len(prompt) > room:
      prompt, truncated = cut_prompt(prompt, room, truncation), truncated + 1
    rows.append(PairRow(*(np.asarray(x, np.int32) for x in (prompt, chosen, rejected))))
  return rows, truncated


def pair_length(row: PairRow) -> int:
  """Tokens in the longer of the two sequences (for bucketing and padding)."""
  return len(row.prompt_ids) + max(len(row.chosen_ids), len(row.rejected_ids))


def _fill(ids, attn, loss, r, prompt, completion, length: int, name: str):
  n = len(prompt) + len(completion)
  if n > length:
    raise DataError(f"{name}: {n} tokens do not fit the padded length {length}")
  ids[r, :n] = np.concatenate([prompt, completion])
  attn[r, :n] = 1
  loss[r, len(prompt):n] = 1


def pad_pairs(rows: Sequence[PairRow], length: int, pad_id: int = 0) -> dict:
  """PairRows -> {"input_ids", "attention_mask", "loss_mask"}, each [B, 2, length] int32.

  Index 0 along axis 1 is prompt + chosen, 1 is prompt + rejected; right
  padded; loss_mask marks the completion tokens (eos included).
  """
  b = len(rows)
  ids = np.full((b * 2, length), pad_id, np.int32)
  attn = np.zeros((b * 2, length), np.int32)
  loss = np.zeros((b * 2, length), np.int32)
  for r, row in enumerate(rows):
    _fill(ids, attn, loss, 2 * r, row.prompt_ids, row.chosen_ids, length, f"pair {r} (chosen)")
    _fill(ids, attn, loss, 2 * r + 1, row.prompt_ids, row.rejected_ids, length, f"pair {r} (rejected)")
  return {k: v.reshape(b, 2, length) for k, v in (("input_ids", ids), ("attention_mask", attn), ("loss_mask", loss))}


# ---------------------------------------------------------------------------- unpaired (KTO)


def _label(value, i: int, where: str) -> bool:
  if isinstance(value, (bool, np.bool_)) or value in (0, 1):
    return bool(value)
  raise DataError(f"{where}: row {i}: label must be true/false (desirable or not), got {value!r}")


def unpaired_examples(rows, tokenizer, *, chat: bool, template: str = "{text}", system: str = "",
                      where: str = "unpaired data") -> list[dict]:
  """-> [{"prompt", "completion", "desirable"}] for KTO.

  Preference rows (any layout) give two rows each, chosen desirable and
  rejected not; as TRL's `unpair_preference_dataset` does, all chosen rows come
  first, then all rejected ones. Rows of TRL's unpaired layout
  (prompt/completion/label, prompt a string or messages) give one row each.
  """
  good, bad, out = [], [], []
  for i, row in enumerate(rows):
    if isinstance(row, dict) and "completion" in row and "chosen" not in row and "rejected" not in row:
      if "label" not in row:
        raise DataError(f"{where}: row {i} has a completion but no 'label'; fields: {sorted(row)}")
      label = _label(row["label"], i, where)
      prompt = _render(tokenizer, _prompt_of(row, i, where), i, chat=chat, template=template, system=system,
                       where=where)
      out.append({"prompt": prompt, "completion": _completion(row["completion"], i, "completion", where),
                  "desirable": label})
      continue
    pair = _preference(row, i, tokenizer, chat=chat, template=template, system=system, where=where)
    good.append({"prompt": pair["prompt"], "completion": pair["chosen"], "desirable": True})
    bad.append({"prompt": pair["prompt"], "completion": pair["rejected"], "desirable": False})
  return out + good + bad


class UnpairedRow(NamedTuple):
  prompt_ids: np.ndarray
  completion_ids: np.ndarray
  desirable: bool


def tokenize_unpaired(examples, tokenizer, max_length: int, chat: bool,
                      truncation: str = "left") -> tuple[list[UnpairedRow], int]:
  """-> (rows, number of prompts truncated); prompts cut as in `tokenize_pairs`, never completions."""
  cut_prompt([], 0, truncation)  # a bad value is named before any row
  rows, truncated = [], 0
  for i, ex in enumerate(examples):
    prompt = tokenizer(ex["prompt"], add_special_tokens=not chat)["input_ids"]
    completion = response_ids(tokenizer, ex["completion"], chat)
    room = max_length - len(completion)
    if room < 1:
      raise DataError(f"row {i}: a completion of {len(completion)} tokens leaves no room for the prompt "
                      f"in max_length={max_length}")
    if len(prompt) > room:
      prompt, truncated = cut_prompt(prompt, room, truncation), truncated + 1
    rows.append(UnpairedRow(np.asarray(prompt, np.int32), np.asarray(completion, np.int32), bool(ex["desirable"])))
  return rows, truncated


def unpaired_length(row: UnpairedRow) -> int:
  return len(row.prompt_ids) + len(row.completion_ids)


def pad_unpaired(rows: Sequence[UnpairedRow], length: int, pad_id: int = 0) -> dict:
  """UnpairedRows -> a KTO batch: input_ids/attention_mask/loss_mask [B, length], desirable [B],
  and kl_input_ids/kl_attention_mask/kl_loss_mask [B, length] for the KL estimate.

  KL row i is prompt i with the completion of row (i - 1) mod B, TRL 1.16's
  convention ((x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1})): the mismatched
  completions are the batch's own. A KL prompt that does not fit `length` with
  its borrowed completion is cut from the left. B must be at least 2, else the
  KL row is the matched pair.
  """
  b = len(rows)
  if b < 2:
    raise DataError(f"a KTO batch needs at least 2 rows for its mismatched KL pairs, got {b}")
  out = {}
  for prefix, shift in (("", 0), ("kl_", 1)):
    ids = np.full((b, length), pad_id, np.int32)
    attn = np.zeros((b, length), np.int32)
    loss = np.zeros((b, length), np.int32)
    for r, row in enumerate(rows):
      completion = rows[(r - shift) % b].completion_ids
      prompt = row.prompt_ids
      if shift and len(prompt) + len(completion) > length:
        prompt = prompt[len(prompt) + len(completion) - length:]
      _fill(ids, attn, loss, r, prompt, completion, length, f"{'KL ' if shift else ''}row {r}")
    out.update({f"{prefix}input_ids": ids, f"{prefix}attention_mask": attn, f"{prefix}loss_mask": loss})
  out["desirable"] = np.asarray([row.desirable for row in rows], bool)
  return out


# ---------------------------------------------------------------------------- reward pairs


def reward_pairs(rows, *, n_pairs: int, seed: int, min_diff: float = 0.0) -> list[dict]:
  """Seeded pairs of distinct snippets from ONE split of data/sentiment (text, score in [-4, 4]).

  chosen = the snippet with the higher mean human rating; margin = the rating
  difference. Pairs whose ratings are equal, differ by less than `min_diff`,
  or whose texts are the same are skipped, and no pair is drawn twice.
  """
  rows = list(rows)
  for i, r in enumerate(rows):
    if "text" not in r or not isinstance(r.get("score"), (int, float)):
      raise DataError(f"sentiment data: row {i} needs a text and a numeric score; got {sorted(r)}")
  texts = [str(r["text"]) for r in rows]
  scores = np.asarray([float(r["score"]) for r in rows])
  if len(rows) < 2:
    raise DataError(f"sentiment data: {len(rows)} rows cannot make a pair")
  rng = np.random.default_rng(seed)
  seen, out = set(), []
  for _ in range(100):  # rounds of candidates; a few suffice unless min_diff or n_pairs is extreme
    a, b = rng.integers(0, len(rows), (2, 4 * max(n_pairs - len(out), 16)))
    for i, j in zip(a.tolist(), b.tolist()):
      key = (min(i, j), max(i, j))
      diff = abs(scores[i] - scores[j])
      if i == j or key in seen or diff == 0 or diff < min_diff or texts[i] == texts[j]:
        continue
      seen.add(key)
      hi, lo = (i, j) if scores[i] > scores[j] else (j, i)
      out.append({"chosen": texts[hi], "rejected": texts[lo], "margin": float(diff),
                  "chosen_score": float(scores[hi]), "rejected_score": float(scores[lo])})
      if len(out) == n_pairs:
        return out
  raise DataError(f"sentiment data: found only {len(out)} of {n_pairs} distinct pairs with rating difference "
                  f">= {min_diff} among {len(rows)} rows")


def rating_buckets(diff: float, same_polarity: bool) -> str:
  """The report bucket (one of BUCKETS) of a pair whose ratings differ by `diff`."""
  diff = abs(diff)
  if diff >= 2:
    return ">=2"
  if diff >= 1:
    return "1-2 same polarity" if same_polarity else "1-2 opposite polarity"
  return "<1"


def reward_examples(pairs, tokenizer, template: str, chat: bool, system: str = "") -> list[dict]:
  """Reward pairs -> [{"chosen", "rejected", "margin"}], each text rendered as the reward model's prompt
  (`template` with {text}, e.g. "Review: {text}", in the chat template if asked)."""
  return [{"chosen": render_prompt(tokenizer, p["chosen"], template, chat, system),
           "rejected": render_prompt(tokenizer, p["rejected"], template, chat, system),
           "margin": float(p["margin"])} for p in pairs]


# ---------------------------------------------------------------------------- splits


def split_of(path: str, split: str, *, train_split: str, holdout: float, seed: int) -> list[dict]:
  """The rows of one split: `path/{split}.json(l)` in a folder, or a seeded part of one file.

  One file (as LLaMA-Factory ships its demo sets) is split `1 - holdout` /
  `holdout` by `seed`: the train split is the first part, any other split
  name the held-out part.
  """
  path = str(path)
  if os.path.isdir(path):
    for ext in (".jsonl", ".json"):
      file = os.path.join(path, split + ext)
      if os.path.isfile(file):
        return load_json_rows(file)
    raise DataError(f"{path}: no {split}.jsonl or {split}.json; found {sorted(os.listdir(path))}")
  rows = load_json_rows(path)
  keep = held_out(len(rows), split, path, train_split=train_split, holdout=holdout, seed=seed)
  return [rows[i] for i in keep]
