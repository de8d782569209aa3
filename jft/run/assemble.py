"""The one assembler: a config -> model, base params, method, tokenizer, optimizer, state; and a run
folder -> the same parts with its trained leaves restored (`restore`).

Training, `jft eval`, `jft export`, `jft generate`, ablations and reward runs
all build a run's parts here, so they build them the same way. (`restore` and
`merged_base` live together: a run that starts from an earlier run's adapter,
`--init-from`, restores that run while building its own base.)
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections

from jft import objectives, peft, quant
from jft.models import sharding
from jft.core import errors, rules
from jft.models import load_pretrained, load_tokenizer
from jft.models.pretrained import resolve
from jft.quant import sparsity
from jft.models import attention
from jft.models.transformer import remat_policy
from jft.models.pretrained import model_config
from jft.models.transformer import Transformer
from jft.objectives import distill
from jft.run import checkpoint, optim, state
from jft.run.folder import RunError, base_identity, best_manager, check_base, read_config


def build_model(config, mesh=None):
  """-> (model, base params (quantized if configured), method, tokenizer) from a run config.

  With a mesh of more than one device the model pins its activations to it
  (`sharding.activation_sharding`, by the config's axis rules).
  """
  dtype = jnp.dtype(config.model.dtype)
  # what this backend cannot run (offload without pinned host memory, cudnn off a CUDA GPU) fails before loading
  remat_policy(config.model.remat)
  attention.check(config.model.get("attention", "auto"), dtype)
  model, base = load_pretrained(config.model.name, dtype=dtype, remat=config.model.remat,
                                param_dtype=jnp.dtype(config.model.get("param_dtype") or dtype))
  model = model.clone(settings=dataclasses.replace(model.settings, attention=config.model.get("attention", "auto")))
  if config.train.get("init_from"):
    base = merged_base(config.train.init_from, config.model.name, base)
  if mesh is not None:
    pinned = sharding.activation_sharding(mesh, config.train.axis_rules)
    model = model.clone(settings=dataclasses.replace(model.settings, sharding=pinned))
  if config.quant.format:
    base, _ = quant.quantize(base, quant.rules_for(config.quant.format), blocksize=config.quant.blocksize,
                             double_quant=config.quant.double_quant)
  method = objectives.method_of(config)
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
  # a pruned base keeps its zeros (`jft prune`'s record): the merged delta is masked by its pattern
  merged = sparsity.keep_zeros(merged, base, sparsity.read_record(resolve(model_name)))
  flat, want = rules.flatten(merged), rules.flatten(base)
  return rules.unflatten({p: jnp.asarray(quant.as_dense(flat[p]), want[p].dtype) for p in want})


def make_tx(config, trainable, method=None):
  """The run's optax chain for its trainable leaves (`jft.run.optim`)."""
  return optim.make_optimizer(config.optim, config.train.steps, trainable, method)



def build_state(config, method, base, mesh, **kwargs) -> state.State:
  """The run's state (trainable, frozen, optimizer state), placed on `mesh` by the config's sharding rules."""
  return state.build(method, base, mesh, seed=config.seed, make_tx=lambda t: make_tx(config, t, method),
                     axis_rules=config.train.axis_rules, overrides=config.train.sharding_overrides, **kwargs)


@dataclasses.dataclass
class Restored:
  """A run's checkpoint beside the state training started from (`init.trainable`: the method's init)."""
  config: ml_collections.ConfigDict
  model: object  # configured by the method
  method: object
  tokenizer: object
  init: object  # jft.run.state.State built as in training: trainable = the method's initial leaves
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
  The state is built as in training (`jft.run.state`, the run's seed) on `mesh`
  (default: data parallel over this process's devices), whatever mesh the run trained on.
  A damaged newest checkpoint is named through `report` (default: stderr) and the
  newest intact one is used.
  """
  report = report or (lambda line: print(line, file=sys.stderr))
  config = read_config(workdir)
  mesh = mesh if mesh is not None else sharding.make_mesh({"data": -1}, jax.local_devices())
  model, base, method, tokenizer = build_model(config)
  check_base(workdir, base_identity(config.model.name))
  st = build_state(config, method, base, mesh, abstract_opt_state=True)
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


# ---- A distillation's teacher (`objective.hparams.teacher`) -------------------------------------------

def _teacher(config):
  """(objective, base model name, run folder or None, where) of the run's teacher; None when its objective
  has none. A run folder (base.json or checkpoints/ beside its config.json) is read as a run."""
  objective = objectives.from_config(config)
  if not getattr(objective, "uses_teacher", False):
    return None
  source, where = objective.teacher, f"objective.hparams.teacher={objective.teacher!r}"
  if not source:
    raise distill.TeacherError(f"{where}: no teacher; set it to a model name or folder, or a jft run folder")
  if os.path.isdir(source) and os.path.isfile(os.path.join(source, "config.json")) and (
      os.path.isfile(os.path.join(source, "base.json")) or os.path.isdir(os.path.join(source, "checkpoints"))):
    return objective, read_config(source).model.name, source, where
  return objective, source, None, where


def check_teacher(config):
  """Before any weight is read: the teacher exists and shares the student's vocabulary and tokenizer
  (`jft.objectives.distill.Distill.check_teacher`); nothing to check without one."""
  found = _teacher(config)
  if found is not None:
    objective, name, _, where = found
    objective.check_teacher(config.model.name, name, where)


def load_teacher(config, student, mesh=None):
  """-> (teacher model, its params placed on `mesh` by the config's rules) or None without a teacher.

  A run folder's best adapter is folded into its base (`method.merge`), so the teacher runs as a plain
  model through the fused head; a method that cannot merge (prompt tuning...) runs as the run's own
  model. The teacher computes in the student's dtype, with the student's settings (`student`: the
  model `build_model` made: mesh pinning, attention).
  """
  found = _teacher(config)
  if found is None:
    return None
  objective, name, folder, where = found
  objective.check_teacher(config.model.name, name, where)
  dtype, method = jnp.dtype(config.model.dtype), None
  if folder is None:
    model, params = load_pretrained(name, dtype=dtype, remat=config.model.remat)
  else:
    earlier = restore(folder, "best")
    try:
      merged, _ = earlier.method.merge(earlier.tree())
      model = Transformer(model_config(name), dtype=dtype, param_dtype=dtype, remat=config.model.remat)
      params = rules.unflatten({p: jnp.asarray(quant.as_dense(v), dtype) for p, v in rules.flatten(merged).items()})
    except peft.MethodError:  # runs as the run's own model, the method's leaves beside the base
      model, params, method = earlier.model, earlier.params(), earlier.method
  model = model.clone(settings=dataclasses.replace(student.settings, methods=model.settings.methods))
  if mesh is not None:
    params = sharding.put(params, sharding.param_shardings(params, mesh, method, config.train.axis_rules,
                                                           config.train.sharding_overrides))
  return model, params
