"""What every config field may hold: one table, checked before anything is loaded.

`default_config()` is every field with its default (config files start from it, through
`jft.config`), and `SCHEMA` maps each of its leaf paths to a rule (`jft.core.fields`).
`method.hparams` and `objective.hparams` are checked by the rules each method
and objective declares beside its own fields (`hparam_rules`; collected by
`jft.peft.hparam_problems` and `jft.objectives.hparam_problems`), so a new
method or objective is one new file. `validate(config)` checks a whole
config against them (plus the few rules that tie two fields together) and
raises one `ConfigError` naming each bad field, its value and what is
allowed. A field with no rule is itself an error, and a test asserts that
every field has one, so a new field cannot skip validation.

Choices come from the tables of the code that reads the field (registries,
`quant.FORMATS`, `REMAT_POLICIES`...) wherever such a table exists.
`validate_against_model` adds what needs the model's config (its context).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import ml_collections

from jft import objectives, peft, quant
from jft.models import sharding
from jft.core.errors import JftError
from jft.core.fields import (REQUIRED, Choice, Flag, Float, Int, Names, Pairs, Template, Text,  # noqa: F401
                             bool_problem, close, rule_problems, shown)
from jft.models import COMPUTE_DTYPES
from jft.models.attention import IMPLEMENTATIONS as ATTENTION
from jft.models.transformer import DEFAULT_REMAT, REMAT_POLICIES
from jft.models.sharding import AXIS_RULES

DTYPES = COMPUTE_DTYPES


class ConfigError(JftError, ValueError):
  pass


_close = close  # (the name other modules imported)


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in config.items():
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      out.update(flat_keys(value, path + "."))
    else:
      out[path] = value
  return out


def default_config() -> ml_collections.ConfigDict:
  """The fields of a run config, with defaults. Experiment files start here and edit."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # param_dtype "" = dtype; float32 with dtype bfloat16 keeps float32 master weights (full fine-tuning)
  c.model = dict(name="smollm2-135m", dtype="float32", param_dtype="", remat=DEFAULT_REMAT, attention="auto")
  c.method = dict(name="lora", hparams=dict(rank=8, alpha=16.0, targets=("q_proj", "v_proj")))
  c.quant = dict(format="", blocksize=64, double_quant=True)  # format "" = dense base
  # what a step minimises and evaluation reports (jft.objectives): lm, sft, classification, dpo, ...
  c.objective = dict(name="classification", hparams=dict())
  c.data = dict(path=REQUIRED, chat=True, system="", template="{text}", text_field="text",
                label_field="label", labels=("negative", "positive"), prompt_field="prompt",
                response_field="response", max_length=128, truncation="left", pack=False, bucket=1,
                train_split="train", eval_split="validation", test_split="test",
                holdout=0.1,  # one data file (no split files): the seeded fraction held out for evaluation
                max_train_examples=0, max_eval_examples=0, max_test_examples=0)
  c.train = dict(steps=100, batch_size=8, log_every=10, eval_every=0, save_every=50, keep=2,
                 nan_policy="stop", mesh=dict(data=-1, fsdp=1, tensor=1),
                 init_from="",  # an earlier run whose merged adapter is this run's base (--init-from)
                 # logical axis -> mesh axis (jft.models.sharding.AXIS_RULES); path overrides (regex, per-layer spec)
                 axis_rules=AXIS_RULES, sharding_overrides=())
  c.optim = dict(name="adamw", lr=1e-4, schedule="cosine", warmup_steps=10, final_lr_ratio=0.1, b1=0.9,
                 b2=0.999, momentum=0.9, weight_decay=0.0,
                 # base leaves without decay; a method names its own (jft.peft.api.Leaf.decay)
                 decay_rules=((r"(.*/)?(bias|scale)", False),),
                 clip_norm=1.0, grad_accum=1)
  c.eval = dict(batch_size=32, zero_shot=True, zero_shot_split="eval", exact_match=False, metric="accuracy")
  return c



# ---- Rules ----------------------------------------------------------------------------------------
# A rule's `problem(value)` is None when the value is allowed, else what is allowed ("expected ...").

def _mesh_target_problem(target) -> Optional[str]:
  """None, a mesh axis, or a tuple of mesh axes (jft.models.sharding)."""
  axes = (target,) if isinstance(target, str) else target
  if target is None or (isinstance(axes, (tuple, list)) and all(a in sharding.AXES for a in axes)):
    return None
  return f"{target!r} is not a mesh axis ({', '.join(sharding.AXES)}), a tuple of them or None"


def _spec_problem(spec) -> Optional[str]:
  if not isinstance(spec, (tuple, list)):
    return "expected a spec: a tuple of mesh axes / tuples of them / None, one per array axis"
  return next(filter(None, map(_mesh_target_problem, spec)), None)


METHOD_NAME = peft.NAME_RULE


# ---- The schema -----------------------------------------------------------------------------------

SCHEMA: dict[str, Any] = {
    "seed": Int(0),
    "model.name": Text(nonempty=True, note="an HF folder, a .gguf file or an embedded model name"),
    "model.dtype": Choice(DTYPES, note="the compute dtypes the model supports"),
    "model.param_dtype": Choice(("",) + tuple(DTYPES), note="'' = model.dtype; the stored (master) weights"),
    "model.remat": Choice(lambda: list(REMAT_POLICIES)),
    "model.attention": Choice(ATTENTION, note="auto = cudnn on a CUDA GPU where it applies, else xla"),
    "method.name": METHOD_NAME,
    "quant.format": Choice(lambda: ("",) + tuple(quant.FORMATS), note="'' = a dense base"),
    "quant.blocksize": Int(1),
    "quant.double_quant": Flag(),
    "objective.name": Choice(lambda: sorted(objectives.OBJECTIVES)),
    "data.path": Text(nonempty=True),
    "data.chat": Flag(),
    "data.system": Text(),
    "data.template": Template(),
    "data.text_field": Text(nonempty=True),
    "data.label_field": Text(nonempty=True),
    "data.labels": Names(min_len=1),
    "data.prompt_field": Text(nonempty=True),
    "data.response_field": Text(nonempty=True),
    "data.max_length": Int(2),
    "data.truncation": Choice(("left", "right"), note="which end of a too-long prompt is cut"),
    "data.pack": Flag(),
    "data.bucket": Int(1, note="batches sorted by length within windows of this many"),
    "data.train_split": Text(nonempty=True),
    "data.eval_split": Text(note="'' = none"),
    "data.test_split": Text(note="'' = none"),
    "data.holdout": Float(0, 1, hi_open=True),
    "data.max_train_examples": Int(0, note="0 = all"),
    "data.max_eval_examples": Int(0, note="0 = all"),
    "data.max_test_examples": Int(0, note="0 = all"),
    "train.steps": Int(1),
    "train.batch_size": Int(1),
    "train.log_every": Int(1),
    "train.eval_every": Int(0, note="0 = only at the end"),
    "train.save_every": Int(1),
    "train.keep": Int(1),
    "train.nan_policy": Choice(("stop", "skip"), note="on a non-finite loss: stop the run or skip the update"),
    "train.mesh.data": Int(1, also=(-1,), note="-1 = the remaining devices"),
    "train.mesh.fsdp": Int(1, also=(-1,), note="-1 = the remaining devices"),
    "train.mesh.tensor": Int(1, also=(-1,), note="-1 = the remaining devices"),
    "train.init_from": Text(note="'' = the base model"),
    "train.axis_rules": Pairs("(logical axis, mesh axis or tuple of them or None)", _mesh_target_problem,
                              regex=False),
    "train.sharding_overrides": Pairs("(path regex, spec)", _spec_problem),
    "optim.name": Choice(("adamw", "sgd", "adafactor")),
    "optim.lr": Float(0, lo_open=True),
    "optim.schedule": Choice(("cosine", "linear", "constant")),
    "optim.warmup_steps": Int(0),
    "optim.final_lr_ratio": Float(0, 1),
    "optim.b1": Float(0, 1, hi_open=True),
    "optim.b2": Float(0, 1, hi_open=True),
    "optim.momentum": Float(0, 1, hi_open=True, note="sgd; 0 = none"),
    "optim.weight_decay": Float(0),
    "optim.decay_rules": Pairs("(path regex, bool)", bool_problem),
    "optim.clip_norm": Float(0, note="0 = no clipping"),
    "optim.grad_accum": Int(1),
    "eval.batch_size": Int(1),
    "eval.zero_shot": Flag(),
    "eval.zero_shot_split": Choice(("eval", "test"), note="zero-shot evaluation on data.eval_split or data.test_split"),
    "eval.exact_match": Flag(),
    "eval.metric": Text(nonempty=True, note="a metric the objective's evaluation reports"),
}

HPARAMS = ("method.hparams", "objective.hparams")  # checked by the method's / objective's own rules


# ---- Validation -----------------------------------------------------------------------------------

def _cross_problems(c) -> list[str]:
  """Rules that tie fields together (run when every field is valid on its own)."""
  out = []
  mesh = c.train.mesh.to_dict()
  if list(mesh.values()).count(-1) > 1:
    out.append(f"train.mesh={mesh}: at most one axis may be -1 (the remaining devices)")
  try:  # the objective's own checks: GRPO's batch holds whole groups of completions
    objective = objectives.build(c.objective.name, **c.objective.hparams.to_dict())
    objective.rows_per_batch(c.train.batch_size)
  except objectives.ObjectiveError as e:
    return out + [str(e)]
  if c.data.pack and not objective.packable:
    out.append(f"data.pack=True: objective {objective.name} keeps its rows apart (pairs, groups); "
               "set data.pack=false")
  new_tokens = c.objective.hparams.get("max_new_tokens") if objective.online else None
  if new_tokens is not None and new_tokens >= c.data.max_length:
    out.append(f"objective.hparams.max_new_tokens={new_tokens}: expected < data.max_length={c.data.max_length} "
               "(prompt and completion share it)")
  return out


def problems(config) -> list[str]:
  """Every way `config` breaks the schema, one line each (empty: valid). REQUIRED fields are skipped:
  `jft.config.check_required` reports them."""
  flat = flat_keys(config)
  out = []
  for path in SCHEMA:
    if path not in flat:
      out.append(f"{path}: missing (a config file replaced its section without it?)")
  for path, value in flat.items():
    if path.startswith(tuple(h + "." for h in HPARAMS)) or (isinstance(value, str) and value == REQUIRED):
      continue
    if path not in SCHEMA:
      out.append(f"{path}: not a config field{_close(path, SCHEMA)} (a config file set a field that nothing "
                 "reads; every field is in jft.config.schema.SCHEMA)")
      continue
    out += rule_problems(path, SCHEMA[path], value, "jft.config.schema.SCHEMA")
  if "method" in config and "hparams" in config.method:
    out += peft.hparam_problems(config.method.name, config.method.hparams.to_dict(), "method.hparams")
  if "objective" in config and "hparams" in config.objective:
    out += objectives.hparam_problems(config.objective.name, config.objective.hparams.to_dict(), "objective.hparams")
  if not out:
    out += _cross_problems(config)
  return out


def validate(config):
  """Raise one ConfigError listing every bad field of `config` (its value and what is allowed)."""
  found = problems(config)
  if found:
    head = "invalid config: " if len(found) == 1 else f"invalid config ({len(found)} problems): "
    raise ConfigError(head + "; ".join(found))


def longest_sequence(config) -> tuple[int, str]:
  """The most positions a row of this run takes, and why: data.max_length plus the virtual tokens of a
  prompt, p-tuning or prefix method (they take positions before the row's, `Transformer._prefix_length`)."""
  try:
    method = objectives.method_of(config)
  except (peft.MethodError, objectives.ObjectiveError) as e:
    raise ConfigError(f"method.hparams: {e}") from None
  virtual = sum(getattr(m, "num_virtual_tokens", 0) for m in getattr(method, "methods", (method,)))
  why = f"data.max_length={config.data.max_length}"
  if virtual:
    why += f" + {virtual} virtual tokens ({method.name})"
  return config.data.max_length + virtual, why


def validate_against_model(config, model_config):
  """What needs the model's config (`jft.models.config.ModelConfig`, from metadata only, e.g.
  `jft.models.pretrained.model_config(name)`): the longest row must fit the model's context. Call it before
  any weight is read."""
  longest, why = longest_sequence(config)
  context = model_config.max_position_embeddings
  if longest > context:
    raise ConfigError(f"{why} = {longest} positions exceeds the context of model {config.model.name} "
                      f"({context} positions, its max_position_embeddings); set data.max_length to at most "
                      f"{context - (longest - config.data.max_length)}")
