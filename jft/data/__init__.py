"""Data: files or `datasets` objects -> tokenized prompt/response examples -> resumable batches.

    load_split(path, split)            local JSON/JSONL/CSV/TSV/parquet (a folder or a file), any
                                       `datasets` object, or a hub name where a hub is reachable
    classification_examples(...)       text -> prompt, label word -> response
    sft_examples(...)                  prompt/response pairs, chat template or prompt template
    tokenize(...)                      ids + loss mask (response tokens only) + truncation
    Batches                            seeded, epoch-aware order; padding with length bucketing
                                       or packing; its position is part of the checkpoint

Layer 1 (imports core/ only). Beside this loader: `preference.py` (pairs and
unpaired rows in TRL's and ShareGPT's layouts, read through the same JSONL and
split functions) and `token_ids.py` (ids checked against a vocabulary).
Every objective reads its split through `split_file`/`load_split`, so one file
is split by `data.holdout` the same way for every objective.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from jft.core import progress
from jft.core.errors import JftError
from jft.data.token_ids import first_bad_id

EXTENSIONS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


class DataError(JftError, ValueError):
  pass


def _verify_checksum(folder: str, file: str):
  sums = os.path.join(folder, "SHA256SUMS")
  if not os.path.isfile(sums):
    return
  expected = dict(reversed(line.split()) for line in read_text(sums).splitlines() if line.strip())
  if file in expected:
    with open(os.path.join(folder, file), "rb") as f:
      digest = hashlib.sha256(f.read()).hexdigest()
    if digest != expected[file]:
      raise DataError(f"{os.path.join(folder, file)}: checksum mismatch (expected {expected[file][:12]}..., "
                      f"got {digest[:12]}...); rebuild it with scripts/prepare_data.py")


def load_split(source: Any, split: str = "train", *, train_split: str | None = None, holdout: float = 0.0,
               seed: int = 0):
  """A `datasets.Dataset` for one split of a local folder/file, a DatasetDict, or a hub name.

  A folder holds one file per split (`train.jsonl`, `validation.jsonl`...). One file serves every
  split only through `train_split` and `holdout` (what every objective passes, from `data.*`): the
  train split is a seeded `1 - holdout` of its rows and any other split the held-out rest
  (`held_out`), so evaluation never runs on the training rows. Without `train_split` (a library
  call) the file is returned whole.
  """
  import datasets

  datasets.disable_progress_bars()  # its per-file bars flash past for embedded files; jft reports its own

  if isinstance(source, datasets.DatasetDict):
    if split not in source:
      raise DataError(f"no split {split!r}; have {sorted(source)}")
    return source[split]
  if isinstance(source, datasets.Dataset):
    return source
  path = str(source)
  if os.path.isdir(path):
    file = split_file(path, split)
    if file is None:
      raise DataError(f"{path}: no file for split {split!r} (looked for {split}{{{','.join(EXTENSIONS)}}}); "
                      f"found {sorted(os.listdir(path))}")
    _verify_checksum(path, os.path.basename(file))
    path = file
  if os.path.isfile(path):
    ext = os.path.splitext(path)[1]
    if ext not in EXTENSIONS:
      raise DataError(f"{path}: unsupported file type {ext!r}; use one of {sorted(EXTENSIONS)}")
    _check_rows_file(path, ext)
    kwargs = {"delimiter": "\t"} if ext == ".tsv" else {}
    try:
      ds = datasets.load_dataset(EXTENSIONS[ext], data_files={split: path}, split=split, **kwargs)
    except Exception as e:  # pyarrow/pandas/datasets raise many types (rows of mixed types, ragged CSV...)
      cause = e.__cause__ or e
      raise DataError(f"{path}: cannot be read as a table of rows ({type(cause).__name__}: "
                      f"{(str(cause).splitlines() or [''])[0][:200]})") from e
    if train_split is None or os.path.isdir(str(source)):
      return ds
    return ds.select(held_out(len(ds), split, path, train_split=train_split, holdout=holdout, seed=seed))
  if os.path.sep in path or path.startswith("."):
    raise DataError(f"{path}: no such file or folder")
  return datasets.load_dataset(path, split=split)  # a hub dataset, where a hub is reachable


def split_file(folder: str, split: str) -> str | None:
  """The file of `split` in a data folder (`validation.jsonl`, `test.csv`...), or None."""
  for name in sorted(os.listdir(folder)):
    if os.path.splitext(name)[0] == split and os.path.splitext(name)[1] in EXTENSIONS:
      return os.path.join(folder, name)
  return None


def split_record(d, split: str, rows: int) -> dict:
  """Where one split of a run came from, for `results.json` (`data.splits`): its file, its row count, and
  whether it is the held-out part of one file."""
  path = str(d.path)
  if os.path.isdir(path):
    return {"source": split_file(path, split) or path, "rows": rows, "holdout": False}
  return {"source": path, "rows": rows, "holdout": os.path.isfile(path) and split != d.train_split}


def holdout_of(d) -> dict:
  """`load_split`'s keywords from a config's `data` section: how one file is split (seed 0, as always)."""
  return {"train_split": d.train_split, "holdout": d.holdout, "seed": 0}


def split_rows(rows: Sequence, eval_fraction: float = 0.1, seed: int = 0) -> tuple[list, list]:
  """-> (train, eval): a seeded random `eval_fraction` of the rows is held out; both keep file order."""
  if not 0 <= eval_fraction < 1:
    raise DataError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
  rows = list(rows)
  n_eval = int(round(eval_fraction * len(rows)))
  held = set(np.random.default_rng(seed).permutation(len(rows))[:n_eval].tolist())
  return ([r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held])


def held_out(n: int, split: str, path: str, *, train_split: str, holdout: float, seed: int) -> list[int]:
  """Which of one file's `n` rows make `split`: the train split keeps `1 - holdout` of them (seeded), any
  other split the held-out rows. With `holdout` 0 an evaluation split would be the training rows: an error."""
  if split != train_split and not holdout:
    raise DataError(f"{path}: one file serves every split and data.holdout=0, so the {split!r} split would be the "
                    f"training rows; set data.holdout (e.g. 0.1) or give a folder with a {split} file")
  train, held = split_rows(range(n), holdout, seed)
  if split != train_split and not held:
    raise DataError(f"{path}: data.holdout={holdout} of {n} rows holds out none for the {split!r} split")
  return train if split == train_split else held


def _check_rows_file(path: str, ext: str):
  """An empty file, bytes that are not UTF-8, or a JSONL line that is not a JSON object, as an error
  naming the file and line (datasets reports these without the file, the line, or at all: `StopIteration`)."""
  if ext == ".parquet":
    return
  text = read_text(path)
  if not (jsonl_rows(path, text) if ext == ".jsonl" else text.strip()):
    raise DataError(f"{path}: the file is empty (no rows)")


def read_text(path: str) -> str:
  """A data file's text; bytes that are not UTF-8 are an error naming the file, line and byte offset."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line = raw.count(b"\n", 0, e.start) + 1
    raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}, line {line}); "
                    "save the file as UTF-8") from None


def jsonl_rows(path: str, text: str | None = None) -> list[dict]:
  """The rows of a JSONL file (one JSON object a line; blank lines skipped), each bad line named."""
  rows = []
  for number, line in enumerate((read_text(path) if text is None else text).splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except ValueError as e:
      raise DataError(f"{path}:{number}: not valid JSON ({getattr(e, 'msg', e)} at column "
                      f"{getattr(e, 'colno', '?')})") from None
    if not isinstance(row, dict):
      raise DataError(f"{path}:{number}: line {number} is a JSON {type(row).__name__}, not an object of fields")
    rows.append(row)
  return rows


def check_token_ids(rows, vocab_size: int, where: str):
  """Every integer array in `rows` (ids, masks; any nesting) inside the model's vocabulary, 0..vocab_size-1
  (`jft.data.token_ids.first_bad_id`, the check of `jft.models.check_ids`).

  A tokenizer with tokens the embedding table lacks (added special tokens, another model's
  tokenizer) would otherwise index past the table, which gives NaN logits without an error.
  """
  def walk(x, index):
    if isinstance(x, np.ndarray):
      found = first_bad_id(x, vocab_size) if x.dtype.kind in "iu" else None
      if found is not None:
        raise DataError(f"{where}: row {index} has token id {found[1]}, outside the model's vocabulary "
                        f"(0..{vocab_size - 1}); does the tokenizer belong to this model?")
    elif isinstance(x, dict):
      for v in x.values():
        walk(v, index)
    elif isinstance(x, (list, tuple)) and x and not isinstance(x[0], (int, np.integer)):
      for v in x:
        walk(v, index)
    elif isinstance(x, (list, tuple)) and x:
      walk(np.asarray(x), index)

  for i, row in enumerate(rows):
    walk(row, i)


def field(row: dict, name: str, where: str):
  """row[name], or an error naming the fields the rows do have."""
  if name not in row:
    raise DataError(f"{where}: rows have no field {name!r}; fields: {sorted(row)}")
  return row[name]


def text_of(row: dict, name: str, where: str, index: int, default: str | None = None) -> str:
  """row[name] as text: a string (a number is read as its digits). Anything else, an object or a list,
  is an error naming the row and field: formatting it would train on its Python repr."""
  value = row.get(name) if default is not None else field(row, name, where)
  if value is None and default is not None:
    return default
  if isinstance(value, bool) or not isinstance(value, (str, int, float)):
    kind = {dict: "an object", list: "a list", bool: "true/false", type(None): "null"}.get(type(value),
                                                                                             type(value).__name__)
    raise DataError(f"{where}: row {index}: field {name!r} is {kind} ({json.dumps(value, default=str)[:60]}), "
                    "expected text")
  return str(value)


def render_prompt(tokenizer, text: str, template: str, chat: bool, system: str = "") -> str:
  """The prompt string: `template` with {text}, wrapped in the chat template if asked and available
  (with `system` as the system message; empty keeps the template's default)."""
  prompt = template.format(text=text)
  if chat and getattr(tokenizer, "chat_template", None):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  return prompt


def classification_examples(dataset, tokenizer, *, text_field: str, label_field: str, labels: Sequence[str],
                            template: str, chat: bool, limit: Optional[int] = None, system: str = ""):
  """Rows -> [{"prompt", "response", "label"}]: classification as generation of a label word."""
  out = []
  for i, row in enumerate(dataset):
    if limit is not None and i >= limit:
      break
    label = text_of(row, label_field, "classification data", i)
    if label not in labels:
      raise DataError(f"row {i}: label {label!r} is not one of the configured labels {list(labels)}")
    out.append({"prompt": render_prompt(tokenizer, text_of(row, text_field, "classification data", i), template,
                                        chat, system),
                "response": label, "label": labels.index(label)})
  return out


def sft_examples(dataset, tokenizer, *, prompt_field: str, response_field: str, template: str, chat: bool,
                 limit: Optional[int] = None, system: str = ""):
  out = []
  for i, row in enumerate(dataset):
    if limit is not None and i >= limit:
      break
    out.append({"prompt": render_prompt(tokenizer, text_of(row, prompt_field, "SFT data", i), template, chat,
                                        system),
                "response": text_of(row, response_field, "SFT data", i)})
  return out


def response_ids(tokenizer, response: str, chat: bool) -> list[int]:
  """Response tokens, ending with the end-of-turn/eos token so the model learns to stop."""
  ids = tokenizer(response if chat else " " + response, add_special_tokens=False)["input_ids"]
  if tokenizer.eos_token_id is not None:
    ids = ids + [tokenizer.eos_token_id]
  return ids


def cut_prompt(prompt: list[int], room: int, truncation: str) -> list[int]:
  """A too-long prompt cut to `room` tokens: from the left (keeping its end, where the question is) or the
  right. The one truncation rule of every row kind (prompt/response, pairs, unpaired)."""
  if truncation not in ("left", "right"):
    raise DataError(f"truncation must be 'left' or 'right', got {truncation!r}")
  return prompt if len(prompt) <= room else prompt[-room:] if truncation == "left" else prompt[:room]


def tokenize(examples, tokenizer, max_length: int, chat: bool, truncation: str = "left"):
  """-> list of (input_ids, loss_mask) int32 arrays; loss only on response tokens.

  Too long: the prompt is cut (from the left by default, keeping its end, where
  the question is), never the response; a response longer than max_length is an error.
  """
  out = []
  for ex in examples:
    prompt = tokenizer(ex["prompt"], add_special_tokens=not chat)["input_ids"]
    response = response_ids(tokenizer, ex["response"], chat)
    room = max_length - len(response)
    if room < 1:
      raise DataError(f"response of {len(response)} tokens does not fit max_length={max_length}: "
                      f"{ex['response'][:60]!r}")
    prompt = cut_prompt(prompt, room, truncation)
    ids = np.asarray(prompt + response, np.int32)
    mask = np.asarray([0] * len(prompt) + [1] * len(response), np.int32)
    out.append((ids, mask))
  return out


def pad_batch(rows, length: int, pad_id: int = 0, left: bool = False):
  """Rows of (ids, loss_mask) -> batch dict; attention_mask marks real tokens."""
  b = len(rows)
  ids = np.full((b, length), pad_id, np.int32)
  attn = np.zeros((b, length), np.int32)
  loss = np.zeros((b, length), np.int32)
  for r, (x, m) in enumerate(rows):
    sl = slice(length - len(x), length) if left else slice(0, len(x))
    ids[r, sl], attn[r, sl], loss[r, sl] = x, 1, m
  return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def pack_rows(rows, length: int, pad_id: int = 0):
  """Greedy packing into rows of `length`: attention_mask holds segment ids 1, 2, ... (0 = padding).

  A segment's first token is never a target (as position 0 of an unpacked row is not): without that,
  the previous segment's last token would be trained to predict it across the boundary.
  """
  packed, current, used = [], [], 0
  for x, m in rows:
    if used + len(x) > length and current:
      packed.append(current)
      current, used = [], 0
    current.append((x, m))
    used += len(x)
  if current:
    packed.append(current)
  ids = np.full((len(packed), length), pad_id, np.int32)
  seg = np.zeros((len(packed), length), np.int32)
  loss = np.zeros((len(packed), length), np.int32)
  for r, group in enumerate(packed):
    pos = 0
    for s, (x, m) in enumerate(group, start=1):
      ids[r, pos:pos + len(x)], seg[r, pos:pos + len(x)], loss[r, pos:pos + len(x)] = x, s, m
      loss[r, pos] = 0
      pos += len(x)
  return {"input_ids": ids, "attention_mask": seg, "loss_mask": loss}


@dataclasses.dataclass
class Batches:
  """An endless, seeded, epoch-aware stream of training batches with a restorable position.

  Rows are whatever the objective's `collate` turns into a batch (default:
  `(ids, loss_mask)` pairs, padded by `pad_batch`). Epoch e visits the
  examples in `permutation(seed, e)`. With `pack`, each
  batch packs the next examples into `batch_size` rows of `max_length`;
  otherwise rows are padded to the longest in the batch (rounded up to a
  multiple of 16, so few shapes compile), and `bucket` > 1 sorts windows of
  `bucket * batch_size` examples by length first (less padding).

  In a multi-process run every process walks the same global order and
  builds only its `shard` of rows, padded to the length the whole global
  batch needs, so all processes agree on every batch's shape.
  """
  rows: list
  batch_size: int
  max_length: int
  seed: int = 0
  pack: bool = False
  bucket: int = 1
  pad_id: int = 0
  shard: Optional[tuple] = None  # (lo, hi): the rows of each global batch this process builds
  collate: Callable = pad_batch  # (rows, length, pad_id) -> batch: an objective's own row layout
  length: Callable = lambda row: len(row[0])  # a row's token count, for padding and bucketing
  epoch: int = 0
  index: int = 0  # batches already taken in this epoch

  def _epoch_batches(self, epoch: int) -> list[list[int]]:
    order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
    if self.pack:  # as `pack_rows` fills rows: a batch ends where its next example would need one row more
      batches, current, rows, fill = [], [], 0, 0
      for i in order:
        n = self.length(self.rows[i])
        if not rows or fill + n > self.max_length:
          if rows == self.batch_size:
            batches.append(current)
            current, rows = [], 0
          rows, fill = rows + 1, 0
        current.append(int(i))
        fill += n
      return batches  # the last partial batch is dropped: every batch is full
    window = self.batch_size * max(self.bucket, 1)
    batches = []
    for start in range(0, len(order) - self.batch_size + 1, window):
      chunk = order[start:start + window]
      if self.bucket > 1:
        chunk = sorted(chunk, key=lambda i: self.length(self.rows[i]))
      batches += [list(map(int, chunk[j:j + self.batch_size]))
                  for j in range(0, len(chunk) - self.batch_size + 1, self.batch_size)]
    if self.bucket > 1:
      rng = np.random.default_rng([self.seed, epoch, 1])
      batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches

  def __post_init__(self):
    if len(self.rows) < self.batch_size:
      raise DataError(f"{len(self.rows)} examples cannot fill one batch of {self.batch_size}")
    self._cache = (None, None)

  def _batches(self):
    if self._cache[0] != self.epoch:
      self._cache = (self.epoch, self._epoch_batches(self.epoch))
    return self._cache[1]

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batches = self._batches()
    if self.index >= len(batches):
      self.epoch, self.index = self.epoch + 1, 0
      batches = self._batches()
    chosen = [self.rows[i] for i in batches[self.index]]
    self.index += 1
    lo, hi = self.shard or (0, self.batch_size)
    if self.pack:
      batch = pack_rows(chosen, self.max_length, self.pad_id)
      if batch["input_ids"].shape[0] < self.batch_size:  # fixed shape: pad with empty rows
        extra = self.batch_size - batch["input_ids"].shape[0]
        batch = {k: np.concatenate([v, np.zeros((extra, self.max_length), v.dtype)]) for k, v in batch.items()}
      return {k: v[lo:hi] for k, v in batch.items()}
    longest = max(map(self.length, chosen))  # of the global batch: one shape in every process
    return self.collate(chosen[lo:hi], min(-(-longest // 16) * 16, self.max_length), self.pad_id)

  @property
  def batches_per_epoch(self) -> int:
    return len(self._batches())

  def state(self) -> dict:
    return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

  def restore(self, state: dict):
    if state.get("seed", self.seed) != self.seed:
      raise DataError(f"data position was saved with seed {state['seed']}, this run uses {self.seed}")
    self.epoch, self.index = int(state["epoch"]), int(state["index"])


def eval_batches(rows, batch_size: int, pad_id: int = 0, left: bool = True) -> Iterable[tuple[dict, int]]:
  """Fixed-order batches for evaluation (left padding, so every prompt ends at the last index)."""
  starts = range(0, len(rows), batch_size)
  for start in progress.track(starts, len(starts), "evaluating (batches)"):
    chunk = rows[start:start + batch_size]
    n = len(chunk)
    chunk = chunk + [chunk[-1]] * (batch_size - n)  # one shape for the whole pass
    longest = max(len(x) for x, _ in chunk)
    batch = pad_batch(chunk, -(-longest // 16) * 16, pad_id, left=left)
    batch["loss_mask"][n:] = 0  # filler rows repeat the last example; they must not count
    batch["valid"] = (np.arange(batch_size) < n).astype(np.int32)
    yield batch, n
