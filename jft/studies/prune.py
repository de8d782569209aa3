"""`jft prune`: a smaller or sparser base model folder, from a model or a run, calibrated on a few rows of data.

    magnitude   |W|, lowest per output row (the comparison group of Wanda's paper; no calibration data)
    wanda       |W| * ||X||_2 per output row (Sun et al. 2023), X the layer's calibration inputs
    sparsegpt   Frantar & Alistarh 2023: per column, OBS updates of the kept weights with the damped
                Hessian 2 X X^T / tokens + 0.01 mean(diag) I, the mask chosen lazily per block of 128 columns
    --sparsity  a fraction of zeros per row (0.5), or N:M (N kept of every M consecutive inputs: 2:4, 4:8)
    --drop-layers F  structured: the contiguous window of round(F * L) blocks whose input and output hidden
                states are closest in angular distance (Gromov et al. 2024, mean over every calibration token)
                is removed and the rest renumbered; before any unstructured pruning, which then sees the
                shorter model

Pruning runs block by block, as both papers do: the calibration rows' hidden states enter block 0, the
inputs of every linear layer of a block are summarised in one pass (through a hook of
`jft.models.hooks`), the block is pruned, and its pruned output is the next block's input. The maths of
one layer lives in `jft.quant.sparsity`. The output is a transformers folder (`save_pretrained`, the writer
of `jft export --format merged`) with `jft_sparsity.json`: the pattern, every pruned module's sparsity
and the dropped layers; the masks are the weights that are exactly zero.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jft import data
from jft.core import files, rules
from jft.core.errors import JftError
from jft.models import hooks, load_pretrained, load_tokenizer
from jft.models.hf import abstract_params, family_module
from jft.models.keymap import active_keys
from jft.models.layers import rope_cos_sin, rope_inv_freq
from jft.models.pretrained import model_config, resolve, save_pretrained
from jft.models.transformer import Block, Transformer, attention_mask_4d, segment_positions
from jft.objectives import from_config as objective_of
from jft.quant import sparsity
from jft.run.assemble import merged_base
from jft.run.folder import read_config
from jft.run.train import examples_for

METHODS = ("magnitude", "wanda", "sparsegpt")
DEFAULT_ROWS = 128
DEFAULT_MAX_LENGTH = 256
BATCH_ROWS = 8
CAPTURE = "jft_prune_capture"


class PruneError(JftError, ValueError):
  pass


class _Capture(hooks.Hook):
  """Sums what pruning needs of a Linear's input x [tokens, in], padding weighted out by the `weights` leaf:
  per-input sums of squares (Wanda's ||X_j||^2) and, with a `hessian` leaf, X^T X (SparseGPT)."""
  group = CAPTURE

  def linear_input(self, p, x, module):
    w = p["weights"].astype(jnp.float32)
    x32 = x.astype(jnp.float32)
    module.sow("intermediates", "sq_norm", jnp.einsum("t,ti->i", w, x32 * x32))
    if "hessian" in p:
      module.sow("intermediates", "xtx", jnp.einsum("ti,tj->ij", x32 * w[:, None], x32))
    return x


hooks.register(CAPTURE, _Capture)


# ----------------------------------------------------------------------------
# What is pruned
# ----------------------------------------------------------------------------

def linear_modules(config) -> list[str]:
  """The linear layers of a block (`self_attn/q_proj`, ...), from the model's parameter shapes."""
  return sorted(p[len("layers/"):-len("/kernel")] for p in rules.flatten(abstract_params(config))
                if p.startswith("layers/") and p.endswith("/kernel"))


def plan(config, targets: str | None) -> dict[int, list[str]]:
  """layer -> the modules pruned there: `targets` is searched (re.search) in `layers/<i>/<module>`
  (`layers/3/mlp/down_proj`); default every linear layer of every block, never embeddings or the head."""
  modules = linear_modules(config)
  pattern = re.compile(targets) if targets else None
  out = {}
  for i in range(config.num_layers):
    chosen = [m for m in modules if pattern is None or pattern.search(f"layers/{i}/{m}")]
    if chosen:
      out[i] = chosen
  if not out:
    raise PruneError(f"--targets {targets!r} matches no linear layer; they are layers/<i>/<module> with i in "
                     f"0..{config.num_layers - 1} and module one of {', '.join(modules)}")
  return out


def check_inputs(config, layers: dict, pattern: sparsity.Pattern):
  """N:M needs every pruned row to be whole groups: named before anything loads."""
  shapes = rules.flatten(abstract_params(config))
  for module in sorted({m for ms in layers.values() for m in ms}):
    pattern.check(shapes[f"layers/{module}/kernel"].shape[1], f"layers/{module}")


# ----------------------------------------------------------------------------
# Calibration rows
# ----------------------------------------------------------------------------

def data_rows(path: str, limit: int) -> list[dict]:
  """The first `limit` rows of a JSONL file, each with a `text` field or `prompt` and `response` fields."""
  if not os.path.isfile(path):
    raise data.DataError(f"--data {path}: no such file (a JSONL file of rows with a 'text' field, or 'prompt' and "
                         "'response' fields)")
  rows = data.jsonl_rows(path)[:limit]
  if not rows:
    raise data.DataError(f"--data {path}: the file is empty (no rows)")
  for i, row in enumerate(rows):
    if "text" in row:
      data.text_of(row, "text", path, i)
    elif "prompt" in row and "response" in row:
      data.text_of(row, "prompt", path, i), data.text_of(row, "response", path, i)
    else:
      raise data.DataError(f"{path}: row {i} has neither a 'text' field nor 'prompt' and 'response' fields; "
                           f"its fields: {sorted(row)}")
  return rows


def row_text(row: dict, tokenizer) -> tuple[str, bool]:
  """(text, whether it is already chat-formatted): prompt/response rows through the chat template if any."""
  if "text" in row:
    return str(row["text"]), False
  prompt, response = str(row["prompt"]), str(row["response"])
  if getattr(tokenizer, "chat_template", None):
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return tokenizer.apply_chat_template(messages, tokenize=False), True
  return f"{prompt}\n{response}", False


def file_ids(rows: list[dict], tokenizer, max_length: int) -> list[np.ndarray]:
  out = []
  for row in rows:
    text, chat = row_text(row, tokenizer)
    ids = tokenizer(text, add_special_tokens=not chat)["input_ids"][:max_length]
    if ids:
      out.append(np.asarray(ids, np.int32))
  return out


def run_ids(config, tokenizer, limit: int, max_length: int) -> list[np.ndarray]:
  """The first `limit` training rows of a run, tokenized as its objective does (the prompt and the response,
  or the chosen completion of a pair)."""
  objective = objective_of(config)
  examples = examples_for(config, tokenizer, config.data.train_split, limit)
  out = []
  for row in objective.rows(examples, tokenizer, config.data):
    if hasattr(row, "prompt_ids"):  # preference pairs and unpaired rows
      ids = np.concatenate([row.prompt_ids, getattr(row, "chosen_ids", getattr(row, "completion_ids", None))])
    else:
      ids = np.asarray(row[0])
    if len(ids):
      out.append(ids[:max_length].astype(np.int32))
  return out


def batches(rows: list[np.ndarray], size: int, pad_id: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """(ids, attention mask) batches of rows of similar length, right-padded to a multiple of 64: a few shapes, so
  the block functions compile a few times, not once per batch."""
  order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
  out = []
  for start in range(0, len(order), size):
    chunk = [rows[i] for i in order[start:start + size]]
    length = -(-max(map(len, chunk)) // 64) * 64
    ids = np.full((len(chunk), length), pad_id, np.int32)
    mask = np.zeros((len(chunk), length), np.int32)
    for r, x in enumerate(chunk):
      ids[r, :len(x)], mask[r, :len(x)] = x, 1
    out.append((ids, mask))
  return out


# ----------------------------------------------------------------------------
# The model, one block at a time
# ----------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("config",))
def _embed(config, embedding, positions_table, ids, mask):
  """What the Transformer feeds its first block: embeddings (+ learned positions), the mask, rotary tables."""
  positions = segment_positions(mask)
  x = jnp.take(embedding, ids, axis=0)
  cos = sin = None
  if config.position == "learned":
    x = x + jnp.take(positions_table, positions, axis=0)
  else:
    cos, sin = rope_cos_sin(positions, rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling_dict))
  return x, attention_mask_4d(mask, jnp.arange(ids.shape[1]), config.sliding_window), cos, sin


def _block(config):
  return Block(config, jnp.float32, jnp.float32)


@functools.partial(jax.jit, static_argnames=("config",))
def _run_block(config, params, x, mask4, cos, sin):
  return _block(config).apply({"params": params}, x, None, mask4, cos, sin, jnp.int32(0))[0]


@functools.partial(jax.jit, static_argnames=("config", "modules", "hessian"))
def _capture(config, params, x, mask4, cos, sin, weights, modules, hessian):
  """{module: (sum of x^2 per input, X^T X or None)} of one block's pass over one batch."""
  flat = rules.flatten(params)
  leaves = {"weights": weights, **({"hessian": jnp.zeros(())} if hessian else {})}
  for module in modules:
    for name, leaf in leaves.items():
      flat[f"{module}/{CAPTURE}/{name}"] = leaf
  _, state = _block(config).apply({"params": rules.unflatten(flat)}, x, None, mask4, cos, sin, jnp.int32(0),
                                  mutable=["intermediates"])
  out = {}
  for module in modules:
    node = state["intermediates"]
    for part in module.split("/"):
      node = node[part]
    out[module] = (node["sq_norm"][0], node["xtx"][0] if hessian else None)
  return out


@jax.jit
def _angular(a, b, mask):
  """Sum over real tokens of the angular distance arccos(cos(a, b)) / pi between two hidden states."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  cos = jnp.sum(a * b, -1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-12)
  return jnp.sum(jnp.arccos(jnp.clip(cos, -1.0, 1.0)) / jnp.pi * mask)


def _layer(flat: dict, i: int) -> dict:
  """Block i's params (the stacked `layers/...` leaves at index i)."""
  return rules.unflatten({p[len("layers/"):]: v[i] for p, v in flat.items() if p.startswith("layers/")})


class _Calibration:
  """The calibration batches' hidden states, advanced block by block."""

  def __init__(self, config, flat, batches_):
    table = flat.get("embed_positions/embedding")
    self.masks = [jnp.asarray(mask) for _, mask in batches_]
    self.inputs = [_embed(config, flat["embed_tokens/embedding"], table, jnp.asarray(ids), m)
                   for (ids, _), m in zip(batches_, self.masks)]
    self.hidden = [x for x, _, _, _ in self.inputs]
    self.tokens = int(sum(int(np.sum(mask)) for _, mask in batches_))

  def restart(self):
    self.hidden = [x for x, _, _, _ in self.inputs]

  def advance(self, config, params):
    self.hidden = [_run_block(config, params, h, m4, cos, sin)
                   for h, (_, m4, cos, sin) in zip(self.hidden, self.inputs)]

  def statistics(self, config, params, modules, hessian: bool) -> dict:
    sums = {}
    for h, (_, m4, cos, sin), mask in zip(self.hidden, self.inputs, self.masks):
      weights = mask.reshape(-1).astype(jnp.float32)
      for module, (sq, xtx) in _capture(config, params, h, m4, cos, sin, weights, tuple(modules), hessian).items():
        sq, xtx = np.asarray(sq, np.float64), None if xtx is None else np.asarray(xtx, np.float64)
        if module in sums:
          sums[module] = (sums[module][0] + sq, None if xtx is None else sums[module][1] + xtx)
        else:
          sums[module] = (sq, xtx)
    return sums


def layers_to_drop(config, flat, calib: _Calibration, n: int) -> tuple[int, list[float]]:
  """(first layer, distances): the window of n blocks whose input and output hidden states are closest in
  mean angular distance over the calibration tokens (Gromov et al.), and that distance for every window."""
  total = np.zeros(config.num_layers - n + 1)
  params = [_layer(flat, i) for i in range(config.num_layers)]
  for b, (x, m4, cos, sin) in enumerate(calib.inputs):
    states, h = [x], x
    for p in params:
      h = _run_block(config, p, h, m4, cos, sin)
      states.append(h)
    mask = calib.masks[b].astype(jnp.float32)
    for start in range(len(total)):
      total[start] += float(_angular(states[start], states[start + n], mask))
  distances = [float(d) / calib.tokens for d in total]
  return int(np.argmin(distances)), distances


def prune_layer(method: str, w, pattern: sparsity.Pattern, sq_norm=None, xtx=None, tokens: int = 1) -> np.ndarray:
  """One layer's weight [out, in] pruned by `method` (the statistics of its calibration inputs beside it)."""
  if method == "sparsegpt":
    return sparsegpt_layer(w, xtx, tokens, pattern)
  scores = sparsity.magnitude_scores(w) if method == "magnitude" else sparsity.wanda_scores(w, sq_norm)
  return np.where(sparsity.prune_mask(scores, pattern), np.float32(0), np.asarray(w, np.float32))


def sparsegpt_layer(w, xtx, tokens: int, pattern: sparsity.Pattern) -> np.ndarray:
  return sparsity.sparsegpt(w, 2.0 * np.asarray(xtx, np.float64) / max(tokens, 1), pattern)


# ----------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------

def prune(out: str, *, model: str | None = None, workdir: str | None = None, data_path: str | None = None,
          method: str = "wanda", sparsity_spec: str | None = None, calibration: int = DEFAULT_ROWS,
          max_length: int = DEFAULT_MAX_LENGTH, targets: str | None = None, drop_layers: float = 0.0,
          overwrite: bool = False, batch_rows: int = BATCH_ROWS, report=None) -> dict:
  """Prune `model` (or run `workdir`'s model, its adapter merged) and write the base model folder `out`;
  -> the record written beside it (`jft_sparsity.json`). Every input is checked before anything loads."""
  report = report or (lambda line: print(line, file=sys.stderr, flush=True))
  t0 = time.time()
  if (model is None) == (workdir is None):
    raise PruneError("give exactly one of --model NAME_OR_FOLDER and --workdir RUN")
  if method not in METHODS:
    raise PruneError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
  pattern = sparsity.parse_pattern(sparsity_spec) if sparsity_spec is not None else None
  if not 0.0 <= drop_layers < 1.0:
    raise PruneError(f"--drop-layers {drop_layers}: expected a fraction of the layers in [0, 1)")
  if pattern is None and not drop_layers:
    raise PruneError("nothing to do: give --sparsity (0.5, 2:4, 4:8) and/or --drop-layers FRACTION")
  if calibration < 1 or max_length < 2:
    raise PruneError(f"--calibration {calibration} / --max-length {max_length}: expected at least 1 row of at "
                     "least 2 tokens")
  if targets is not None:
    try:
      re.compile(targets)
    except re.error as e:
      raise PruneError(f"--targets {targets!r}: not a regular expression ({e})") from None
  needs_data = drop_layers > 0 or (pattern is not None and method != "magnitude")
  rows = None
  if workdir is not None:
    run_config = read_config(workdir)
    name = run_config.model.name
  else:
    name = model
    if data_path is None and needs_data:
      raise PruneError(f"--method {method}{' with --drop-layers' if drop_layers else ''} needs calibration rows: "
                       "give --data FILE (JSONL rows with a 'text' field, or 'prompt' and 'response' fields)")
    if data_path is not None and needs_data:
      rows = data_rows(data_path, calibration)
  source = resolve(name)
  out = files.check_output(out, overwrite=overwrite, protected=(workdir,) if workdir else (source,))
  config = model_config(name)
  dropped = int(np.floor(drop_layers * config.num_layers + 0.5))
  if dropped >= config.num_layers:
    raise PruneError(f"--drop-layers {drop_layers}: removing {dropped} of {config.num_layers} layers leaves none")
  if pattern is not None:  # targets and N:M checked against the model that will be pruned
    layers = plan(config.replace(num_layers=config.num_layers - dropped), targets)
    check_inputs(config, layers, pattern)

  report(f"loading {name} ...")
  _, params = load_pretrained(name, dtype=jnp.float32)
  tokenizer = load_tokenizer(name)
  if workdir is not None:
    params = merged_base(workdir, name, params)
  flat = {p: np.array(v, np.float32) for p, v in rules.flatten(params).items()}
  calib, ids = None, []
  if needs_data:
    ids = (run_ids(run_config, tokenizer, calibration, max_length) if workdir is not None
           else file_ids(rows, tokenizer, max_length))
    if not ids:
      raise PruneError(f"{data_path or workdir}: no calibration row has a token")
    calib = _Calibration(config, flat, batches(ids, batch_rows, tokenizer.pad_token_id or 0))
    report(f"calibration: {len(ids)} rows, {calib.tokens} tokens")

  record = {"format": 1, "source": workdir or name, "method": method if pattern else None,
            "pattern": str(pattern) if pattern else None, "targets": targets,
            "calibration": {"rows": len(ids), "tokens": calib.tokens if calib else 0,
                            "max_length": max_length, "data": data_path if workdir is None else f"{workdir} (train)"},
            "dropped_layers": [], "modules": []}
  if dropped:
    start, distances = layers_to_drop(config, flat, calib, dropped)
    gone = list(range(start, start + dropped))
    for p in flat:
      if p.startswith("layers/"):
        flat[p] = np.delete(flat[p], gone, axis=0)
    config = config.replace(num_layers=config.num_layers - dropped)
    record.update(dropped_layers=gone, angular_distance={"window": dropped, "by_first_layer": distances})
    report(f"dropped layers {gone[0]}..{gone[-1]} (mean angular distance {distances[start]:.4f}; "
           f"{config.num_layers} left)")
    calib.restart()
  if pattern is not None:
    record["modules"] = _prune_blocks(config, flat, layers, method, pattern, calib, report)
    kept = sum(m["size"] for m in record["modules"])
    record["sparsity"] = sum(m["sparsity"] * m["size"] for m in record["modules"]) / kept
  record["num_hidden_layers"] = config.num_layers
  record["seconds"] = round(time.time() - t0, 2)

  def write(folder):
    save_pretrained(Transformer(config), rules.unflatten(flat), folder, tokenizer=tokenizer)
    files.write_json(os.path.join(folder, sparsity.RECORD), record)

  files.write_folder(out, write)
  return record


def _prune_blocks(config, flat, layers, method, pattern, calib, report) -> list[dict]:
  """Every planned module pruned, block by block; the calibration states advance through each pruned block."""
  names = {k.path: k.hf for k in active_keys(family_module(config.family).KEYS, config)}
  modules = []
  for i in range(config.num_layers):
    chosen = layers.get(i, [])
    if chosen and method != "magnitude":
      stats = calib.statistics(config, _layer(flat, i), chosen, hessian=method == "sparsegpt")
    for module in chosen:
      path = f"layers/{module}/kernel"
      sq, xtx = stats[module] if method != "magnitude" else (None, None)
      w = prune_layer(method, flat[path][i].T, pattern, sq_norm=sq, xtx=xtx, tokens=calib.tokens if calib else 1)
      flat[path][i] = w.T
      modules.append({"path": path, "layer": i, "name": names[path].format(i=i),
                      "sparsity": float(np.mean(w == 0)), "size": int(w.size)})
    if calib is not None and i + 1 < config.num_layers and method != "magnitude":
      calib.advance(config, _layer(flat, i))
    if chosen:
      done = [m["sparsity"] for m in modules if m["layer"] == i]
      report(f"block {i + 1}/{config.num_layers}: {method} {pattern} on {len(chosen)} layers "
             f"({100 * np.mean(done):.1f}% zeros)")
  return modules
