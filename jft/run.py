"""A run folder: what a run needs to be reproduced, resumed, evaluated and exported.

    WORKDIR/config.json        the resolved config
    WORKDIR/versions.json      python and package versions, git commit
    WORKDIR/base.json          which base model (path, content hash) the adapter belongs to
    WORKDIR/metrics.jsonl      one JSON line per log/eval event
    WORKDIR/tb/                TensorBoard events
    WORKDIR/checkpoints/N/     orbax: trainable params, optimizer state, step, rng, data position
    WORKDIR/best/N/            the best trainable params by the validation metric
    WORKDIR/summary.md         a short human summary, written at the end

The model pieces of a run (`build_model`) are made here from the config, so
training, `jft eval`, `jft export` and `jft generate` build them the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections

from jft import checkpoint, errors, files, objectives, peft, quant, rules, sharding
from jft.errors import JftError
from jft.models import load_pretrained, load_tokenizer
from jft.models.pretrained import resolve


class RunError(JftError, RuntimeError):
  pass


write_json = files.write_json  # the run folder's JSON files, written atomically


def read_config(workdir: str, report=None) -> ml_collections.ConfigDict:
  """The run's config, in today's layout (`jft.schema.upgrade`, each change named through `report`,
  default stderr) and validated like a new one: a bad field is one error naming the file."""
  from jft import schema

  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise RunError(f"{workdir}: not a run folder (no config.json)")
  saved = files.read_json(path, "run config")
  config, notes = schema.upgrade(saved)
  report = report or (lambda line: print(line, file=sys.stderr))
  for note in notes:
    report(f"{path}: {note}")
  found = schema.problems(config)
  if found:
    raise RunError(f"{path}: invalid run config: " + "; ".join(found))
  return config


def versions() -> dict:
  out = {"python": sys.version.split()[0], "platform": platform.platform(),
         "devices": [str(d) for d in jax.devices()]}
  for pkg in ("jft", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "datasets", "numpy"):
    try:
      out[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      out[pkg] = None
  try:
    here = os.path.dirname(os.path.abspath(__file__))
    out["git_commit"] = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                                       text=True, timeout=10).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    out["git_commit"] = None
  return out


def base_identity(name: str) -> dict:
  """Path and SHA-256 of the base checkpoint's weight files (the adapter is only valid on it)."""
  path = resolve(name)
  files = [path] if os.path.isfile(path) else sorted(
      os.path.join(path, f) for f in os.listdir(path) if f.endswith((".safetensors", ".gguf")))
  digest = hashlib.sha256()
  for file in files:
    with open(file, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 24), b""):
        digest.update(chunk)
  return {"name": name, "path": os.path.abspath(path), "sha256": digest.hexdigest()}


def check_base(workdir: str, identity: dict):
  path = os.path.join(workdir, "base.json")
  if not os.path.isfile(path):
    return
  recorded = files.read_json(path, "base model record", {"path": str, "sha256": str})
  if recorded["sha256"] != identity["sha256"]:
    raise RunError(f"{workdir} was trained on base {recorded['path']} (sha256 {recorded['sha256'][:12]}...), "
                   f"but {identity['path']} has sha256 {identity['sha256'][:12]}...; refusing to mix them")


def build_model(config, mesh=None):
  """-> (model, base params (quantized if configured), method, tokenizer) from a run config.

  With a mesh of more than one device the model pins its activations to it
  (`sharding.activation_sharding`, by the config's axis rules).
  """
  dtype = jnp.dtype(config.model.dtype)
  model, base = load_pretrained(config.model.name, dtype=dtype, remat=config.model.remat)
  if config.train.get("init_from"):
    base = merged_base(config.train.init_from, config.model.name, base)
  if mesh is not None:
    pinned = sharding.activation_sharding(mesh, config.train.axis_rules)
    model = model.clone(settings=dataclasses.replace(model.settings, sharding=pinned))
  if config.quant.format:
    base, _ = quant.quantize(base, ((r"layers/.*/kernel", config.quant.format),), blocksize=config.quant.blocksize,
                             double_quant=config.quant.double_quant)
  method = objectives.from_config(config).method(peft.build(config.method.name, **config.method.hparams.to_dict()))
  return model, base, method, load_tokenizer(config.model.name)


def merged_base(workdir: str, model_name: str, base):
  """An earlier run's adapter (its best checkpoint) folded into `base`: the base of a run that starts from it.

  The merged weights are then both what the new method adapts and its
  reference model (`jft.objectives.base_view`). Runs chain: the earlier run
  may itself have started from another.
  """
  if not os.path.isfile(os.path.join(workdir, "config.json")):
    raise RunError(f"--init-from {workdir}: not a run folder (no config.json)")
  earlier = restore(workdir, "best")
  if base_identity(earlier.config.model.name)["sha256"] != base_identity(model_name)["sha256"]:
    raise RunError(f"--init-from {workdir}: that run fine-tuned {earlier.config.model.name}, this one "
                   f"{model_name}; an adapter only applies to its own base")
  try:
    merged, _ = earlier.method.merge(earlier.tree())
  except peft.MethodError as e:
    raise RunError(f"--init-from {workdir}: {e}") from None
  flat, want = rules.flatten(merged), rules.flatten(base)
  return rules.unflatten({p: jnp.asarray(quant.as_dense(flat[p]), want[p].dtype) for p in want})


def make_tx(config, trainable, method=None):
  from jft.optim import make_optimizer
  return make_optimizer(config.optim, config.train.steps, trainable, method)


def best_manager(workdir: str, writer: bool = False, report=print,
                 latest: checkpoint.Checkpoints | None = None) -> checkpoint.Checkpoints:
  """`WORKDIR/best`: the best step only; a failed save of it names the run's intact step in `latest`
  (`checkpoints/`; opened here when the caller has not)."""
  latest = latest or checkpoint.manager(workdir, None, writer=writer, report=report)
  return checkpoint.Checkpoints(os.path.join(workdir, "best"), keep=1, writer=writer, report=report, fallback=latest)


@dataclasses.dataclass
class Restored:
  """A run's checkpoint beside the state training started from (`init.trainable`: the method's init)."""
  config: ml_collections.ConfigDict
  model: object  # configured by the method
  method: object
  tokenizer: object
  init: object  # jft.state.State built as in training: trainable = the method's initial leaves
  trainable: dict  # restored
  step: int
  source: str  # "best" or "latest"

  def tree(self, trainable=None) -> dict:
    """The method's own tree, of `trainable` (default: the restored leaves): beside them the frozen part
    as the run's `init` made it (the base, and frozen method leaves such as VeRA's shared projections,
    rebuilt from the run's seed). This is what the method's own functions take: `merge`, `peft.split`,
    `jft.peft.peft_format.export_peft` (each materializes what it needs itself)."""
    return peft.combine(self.trainable if trainable is None else trainable, self.init.frozen)

  def params(self, trainable=None) -> dict:
    """The params as the model runs them (`method.materialize` of `tree(trainable)`): for the model only.
    Materializing drops what only the method reads (VeRA's shared pair, P-tuning's encoder), so merging
    and exporting take `tree()`."""
    return self.method.materialize(self.tree(trainable))

  def reference(self):
    """The reference model's params (the base view), when the run's objective has one; else None."""
    if not objectives.from_config(self.config).uses_reference:
      return None
    return objectives.base_view(self.method, self.init.frozen)


def restore(workdir: str, which: str = "best", mesh=None, report=None) -> Restored:
  """A run's trainable leaves from its `which` checkpoint, and the state they were trained from.

  `which`: "best" (by the validation metric, if the run tracked one) or "latest".
  The state is built as in training (`jft.state`, the run's seed) on `mesh`
  (default: data parallel over this process's devices), whatever mesh the run trained on.
  A damaged newest checkpoint is named through `report` (default: stderr) and the
  newest intact one is used.
  """
  from jft import state

  report = report or (lambda line: print(line, file=sys.stderr))
  config = read_config(workdir)
  mesh = mesh if mesh is not None else sharding.make_mesh({"data": -1}, jax.local_devices())
  model, base, method, tokenizer = build_model(config)
  check_base(workdir, base_identity(config.model.name))
  st = state.build(method, base, mesh, seed=config.seed, make_tx=lambda t: make_tx(config, t, method),
                   abstract_opt_state=True, axis_rules=config.train.axis_rules,
                   overrides=config.train.sharding_overrides)
  restored, source = None, "best"
  if which == "best" and os.path.isdir(os.path.join(workdir, "best")):
    try:
      restored = best_manager(workdir).restore({"trainable": checkpoint.abstract(st.trainable)},
                                               upgrade=method.upgrade_path, report=report)
    except errors.CorruptCheckpointError as e:
      report(f"{e}; using the newest intact step instead")
  if restored is None:
    template = checkpoint.abstract({"trainable": st.trainable, "opt_state": st.opt_state})
    restored = checkpoint.manager(workdir, keep=None).restore(template, upgrade=method.upgrade_path,
                                                              report=report)
    source = "latest"
  if restored is None:
    raise RunError(f"{workdir}: no checkpoint to restore")
  step, saved, _ = restored
  return Restored(config, method.configure(model), method, tokenizer, st, saved["trainable"], step, source)


def restore_params(workdir: str, which: str = "best", mesh=None):
  """-> (config, model, method, params as the model runs them, tokenizer) of a run (see `restore`).

  The params are for the model (decoding, evaluation); merging or exporting the method takes
  `restore(...).tree()` instead."""
  r = restore(workdir, which, mesh)
  return r.config, r.model, r.method, r.params(), r.tokenizer
