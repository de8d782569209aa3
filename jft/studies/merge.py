"""`jft merge`: LoRA adapters over one base combined into a new run folder, as peft's `add_weighted_adapter` does.

Inputs are jft run folders (their best checkpoint, else the latest) or peft adapter folders; every
input is checked before anything heavy is read: one base (the same weights by content hash, and the
same `--init-from` run), plain LoRA (peft merges no DoRA; a PiSSA adapter belongs to its residual
base, not the model), then the same target modules. The maths is `jft.peft.merge` (where peft's
semantics surprise, it says so).

The output is a run folder that `jft eval`, `export`, `serve` and `generate --workdir` take:

    OUT/config.json      the first run input's config (else one for the peft folders' base), with the
                         method's rank set to the merged rank and alpha = rank (scale 1, no rsLoRA)
    OUT/versions.json    OUT/base.json    as `jft train` writes them
    OUT/checkpoints/0/   the merged adapter (and a fresh optimizer state: the folder restores as a run)
    OUT/peft/            the merged adapter in peft's folder format
    OUT/merge.json       what was merged, how, with which weights, density, rank and seed

It is written whole beside OUT and renamed into place: an error leaves nothing behind. An existing
OUT is replaced only with `overwrite` (an earlier merge's run folder included), and never when it is
a trained run, an input or a base model. A quantized base (QLoRA) is the first run input's: the
deltas do not depend on it.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jft import objectives, peft, run
from jft import config as config_files
from jft.config import REQUIRED, default_config, schema
from jft.core import errors, files, rules
from jft.models import load_pretrained, sharding
from jft.peft import peft_format
from jft.peft.lora import LoRA
from jft.peft.merge import COMBINATIONS, MergeError, check_settings, effective, merge_adapters
from jft.run import checkpoint

RECORD = "merge.json"
FIXED = ("model.name", "train.init_from")  # besides method.*: what the adapters decide
PEFT_FOLDER = "peft"

__all__ = ["COMBINATIONS", "MergeError", "merge", "parse_weights", "write_run"]


def parse_weights(text: str) -> list[float]:
  """`"0.5,0.5"` -> [0.5, 0.5]; anything that is not a comma list of numbers is a named error."""
  try:
    return [float(item) for item in text.split(",")]
  except ValueError:
    raise MergeError(f"--weights {text!r}: expected numbers separated by commas, e.g. 0.5,0.5") from None


class _Input:
  """One adapter to merge: where it is, its kind, its base, and (once loaded) its LoRA leaves."""

  def __init__(self, path: str, base: str | None):
    self.path = path
    if os.path.isfile(os.path.join(path, "config.json")):
      self.kind, self.config = "run", run.read_config(path)
      self.base, self.init_from = self.config.model.name, self.config.train.get("init_from") or ""
      self._check_run_method()
    elif os.path.isfile(os.path.join(path, peft_format.CONFIG)):
      self.kind, self.config = "peft", None
      self.peft_config = files.read_json(os.path.join(path, peft_format.CONFIG), "peft adapter config")
      self.base, self.init_from = base or self.peft_config.get("base_model_name_or_path") or "", ""
      self._check_peft_method()
      if not self.base:
        raise MergeError(f"{path}: its {peft_format.CONFIG} names no base model; give it with --base")
    else:
      raise MergeError(f"{path}: neither a jft run folder (config.json) nor a peft adapter folder "
                       f"({peft_format.CONFIG})")
    self.entries, self.method, self.tree = None, None, None

  def _refuse(self, what: str):
    raise MergeError(f"{self.path}: {what}; merge combines plain LoRA adapters (method lora)")

  def _check_run_method(self):
    method = objectives.method_of(self.config)
    if not isinstance(method, LoRA):
      name = "+".join(m.name for m in method.methods) if isinstance(method, peft.Compose) else method.name
      self._refuse(f"method {name!r} is not LoRA")
    self._check_lora(method)

  def _check_peft_method(self):
    cfg = self.peft_config
    if cfg.get("peft_type") != "LORA":
      self._refuse(f"peft_type {cfg.get('peft_type')!r} is not LORA")
    if cfg.get("modules_to_save"):
      self._refuse(f"it also saves whole modules {cfg['modules_to_save']}")
    if cfg.get("use_dora"):
      self._refuse("it is DoRA (peft's add_weighted_adapter refuses DoRA too)")

  def _check_lora(self, method):
    if method.dora:
      self._refuse("it is DoRA (peft's add_weighted_adapter refuses DoRA too)")
    if method.init_a == "pissa":
      self._refuse("it is PiSSA, whose adapter belongs to the residual base it wrote, not to the model")

  def load(self, bases: dict):
    """Read the adapter: a run restored as `jft eval` restores it, a peft folder onto its base."""
    if self.kind == "run":
      r = run.restore(self.path, "best")
      self.method, self.tree = r.method, r.tree()
    else:
      if self.base not in bases:
        bases[self.base] = load_pretrained(self.base)
      model, params = bases[self.base]
      method, self.tree = peft_format.import_peft(self.path, params, model.config)
      if not isinstance(method, LoRA):
        self._refuse(f"method {method.name!r} is not LoRA")
      self._check_lora(method)
      self.method = method
    flat = rules.flatten(self.tree)
    group = self.method.group
    self.entries = {m: tuple(np.asarray(flat[f"{m}/{group}/{k}"], np.float32) for k in ("a", "b", "scale"))
                    for m in self.method.modules(self.tree)}
    self.tree = None  # only the LoRA leaves are needed from here on


def _check_out(out: str, overwrite: bool, inputs: list[str]) -> str:
  """`out` may be written: new, or (with `overwrite`) an earlier merge's folder or a plain output;
  never an input, inside one, a trained run or its base model."""
  real = os.path.realpath(out)
  for path in inputs:
    other = os.path.realpath(path)
    if real == other or real.startswith(other + os.sep) or other.startswith(real + os.sep):
      raise MergeError(f"--out {out}: refusing to write over or into the input {path}")
  if os.path.lexists(real) and not overwrite:
    raise MergeError(f"--out {out} exists; pass --overwrite to replace it, or choose another path")
  if os.path.isfile(os.path.join(real, RECORD)) and files.is_run_folder(real):
    return real  # an earlier `jft merge` output: replaceable with --overwrite
  return files.check_output(out, overwrite=overwrite, protected=tuple(p for p in inputs if files.is_run_folder(p)))


def _same_base(inputs: list[_Input]):
  identities = {}
  for item in inputs:
    if item.base not in identities:
      try:
        identities[item.base] = run.base_identity(item.base)["sha256"]
      except (errors.CheckpointNotFoundError, OSError) as e:
        raise MergeError(f"{item.path}: its base model {item.base!r} cannot be read ({e}); "
                         "give a local base with --base") from None
  first = inputs[0]
  for item in inputs[1:]:
    if identities[item.base] != identities[first.base]:
      raise MergeError(f"{item.path} adapts base {item.base} (sha256 {identities[item.base][:12]}...), "
                       f"{first.path} adapts {first.base} (sha256 {identities[first.base][:12]}...); "
                       "adapters merge only over one base")
    if os.path.realpath(item.init_from or "/") != os.path.realpath(first.init_from or "/"):
      raise MergeError(f"{item.path} starts from run {item.init_from or '(none)'}, {first.path} from "
                       f"{first.init_from or '(none)'} (--init-from): adapters merge only over one base")


def _same_targets(inputs: list[_Input]):
  first = sorted(inputs[0].entries)
  for item in inputs[1:]:
    mine = sorted(item.entries)
    if mine != first:
      only = sorted(set(mine) ^ set(first))
      raise MergeError(f"{item.path} and {inputs[0].path} target different modules ({', '.join(only[:4])}"
                       f"{' ...' if len(only) > 4 else ''} in one only); merge needs the same targets")


def _merged_config(inputs: list[_Input], rank: int, overrides=()) -> ml_collections.ConfigDict:
  """The first run input's config (else one for the peft folders' base) with the merged LoRA's rank,
  alpha = rank (scale 1) and no rsLoRA, as peft's merged adapter has; then `overrides`."""
  source = next((i for i in inputs if i.kind == "run"), None)
  if source is not None:
    config = ml_collections.ConfigDict(source.config.to_dict())
  else:
    first = inputs[0]
    config = default_config()
    config.model.name = os.path.abspath(first.base) if os.path.exists(first.base) else first.base
    config.objective.name = "lm"
    config.objective.hparams = objectives.default_hparams("lm")
    config.data.path = REQUIRED  # a peft folder has no data: `jft merge ... --config.data.path=FILE` gives it
    config.eval.update(metric="loss", zero_shot=False)
    method = first.method
    config.method.hparams = dict(targets=tuple(method.targets), dropout=method.dropout)
  hparams = config.method.hparams.to_dict()
  hparams.update(rank=int(rank), alpha=float(rank), rslora=False)
  with config.unlocked():
    config.method.name = "lora"
    config.method.hparams = hparams
  for key, text in overrides:
    config_files.override(config, key, text)
  found = schema.problems(config)
  if found:
    raise MergeError("the merged run's config is invalid: " + "; ".join(found))
  return config


def _run_state(config, adapter: dict):
  """(model, method, state) of a run of `config`, its LoRA leaves set to `adapter`, built as `restore` builds it."""
  mesh = sharding.make_mesh({"data": -1}, jax.local_devices())
  model, base, method, _ = run.build_model(config)
  st = run.build_state(config, method, base, mesh)
  flat = rules.flatten(st.trainable)
  group = method.group
  for module, (a, b) in adapter.items():
    for key, value in (("a", a), ("b", b)):
      path = f"{module}/{group}/{key}"
      if path not in flat:
        raise MergeError(f"the run of {config.model.name} has no leaf {path} (its config targets other modules)")
      like = flat[path]
      if tuple(like.shape) != tuple(value.shape):
        raise MergeError(f"{path}: the adapter's shape is {tuple(value.shape)}, the run's {tuple(like.shape)}")
      flat[path] = jax.device_put(jnp.asarray(value, like.dtype), like.sharding)
  missing = sorted({p.rsplit("/", 2)[0] for p in flat if f"/{group}/" in p} - set(adapter))
  if missing:
    raise MergeError(f"the run's config targets modules the adapter lacks: {', '.join(missing[:4])}")
  return model, method, dataclasses.replace(st, trainable=rules.unflatten(flat))


def merge(inputs: list[str], combination: str, weights: list[float], out: str, density: float | None = None,
          svd_rank: int | None = None, seed: int = 0, overwrite: bool = False, base: str | None = None,
          overrides=(), report=None) -> dict:
  """Merge the LoRA adapters of `inputs` (run or peft folders) into the run folder `out`; -> the record
  written to OUT/merge.json. `overrides` [(field, text)] edit the merged run's config as `jft train`'s
  `--config.FIELD=VALUE` do (e.g. the data a merge of peft folders is evaluated on), except the fields
  the merge itself sets. Every check comes before anything is written."""
  report = report or (lambda line: print(line, file=sys.stderr))
  check_settings(combination, list(weights), len(inputs), density, svd_rank)
  if seed < 0:
    raise MergeError(f"--seed {seed}: must be >= 0")
  for key, _ in overrides:
    if key.startswith("method.") or key in FIXED:
      raise MergeError(f"--config.{key}: set by the merge (the adapters' method and base); "
                       "other fields may be overridden")
  out = _check_out(out, overwrite, inputs)
  items = [_Input(path, base) for path in inputs]
  _same_base(items)
  used = effective(combination, len(items))
  if used != combination:
    report(f"merge: one adapter is merged as linear (as peft does), not {combination}")
  bases = {}
  for item in items:
    item.load(bases)
  del bases
  _same_targets(items)
  used, rank, merged = merge_adapters(combination, [i.entries for i in items], weights, density, svd_rank, seed)
  config = _merged_config(items, rank, overrides)
  record = {"inputs": [os.path.abspath(i.path) for i in items], "kinds": [i.kind for i in items],
            "method": combination, "applied": used, "weights": list(weights), "density": density,
            "svd_rank": svd_rank, "seed": seed, "rank": rank,
            "ranks": [max(int(e[0].shape[-1]) for e in i.entries.values()) for i in items],
            "modules": sorted(merged)}
  write_run(out, config, merged, record, report)
  return record


def write_run(out: str, config, adapter: dict, record: dict | None = None, report=None):
  """A run folder at `out` (checked by the caller) whose LoRA leaves are `adapter` {module: (a, b)}
  under `config`, with the adapter also at OUT/peft/ and `record` (if any) at OUT/merge.json, which marks
  the folder as a merge that `overwrite` may replace. The run is built (and any error raised) before
  anything is written; the folder is then written whole and renamed in."""
  report = report or (lambda line: print(line, file=sys.stderr))
  model, method, st = _run_state(config, adapter)
  identity = run.base_identity(config.model.name)
  tree = peft.combine(st.trainable, st.frozen)

  def write(folder):
    os.makedirs(folder, exist_ok=True)
    run.write_json(os.path.join(folder, "config.json"), config.to_dict())
    run.write_json(os.path.join(folder, "versions.json"), run.versions())
    run.write_json(os.path.join(folder, "base.json"), identity)
    checkpoint.manager(folder, keep=None, writer=True, report=report).save(
        0, {"trainable": st.trainable, "opt_state": st.opt_state}, {"merge": record, "step": 0, "best": None})
    peft_format.export_peft(method, tree, model.config, os.path.join(folder, PEFT_FOLDER),
                            base_model=config.model.name)
    if record is not None:
      files.write_json(os.path.join(folder, RECORD), record)

  files.write_folder(out, write)
