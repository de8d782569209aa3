"""What every config field may hold: one table, checked before anything is loaded.

`default_config()` is every field with its default (config files start from it, through
`jft.config`), and `SCHEMA` maps each of its leaf paths to a rule;
`METHOD_HPARAMS` and `OBJECTIVE_HPARAMS` do the same for the hyperparameters
of every registered method and objective. `validate(config)` checks a whole
config against them (plus the few rules that tie two fields together) and
raises one `ConfigError` naming each bad field, its value and what is
allowed. A field with no rule is itself an error, and a test asserts that
every field has one, so a new field cannot skip validation.

Choices come from the tables of the code that reads the field (registries,
`quant.FORMATS`, `REMAT_POLICIES`...) wherever such a table exists.
`validate_against_model` adds what needs the model's config (its context).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import string
from typing import Any, Callable, Iterable, Mapping, Optional

import ml_collections

from jft import align, objectives, peft, quant, sharding
from jft.errors import JftError
from jft.models import COMPUTE_DTYPES
from jft.models.transformer import DEFAULT_REMAT, REMAT_POLICIES
from jft.sharding import AXIS_RULES
from jft.objectives import reward as reward_objective
from jft.peft import bottleneck

DTYPES = COMPUTE_DTYPES
REQUIRED = "???"  # a string field that must be set before a run


class ConfigError(JftError, ValueError):
  pass


def _close(key: str, names: Iterable[str]) -> str:
  close = difflib.get_close_matches(key, list(names), n=3, cutoff=0.5)
  return f" (did you mean {', '.join(close)}?)" if close else ""


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
  c.model = dict(name="smollm2-135m", dtype="float32", remat=DEFAULT_REMAT)
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
                 # logical axis -> mesh axis (jft.sharding.AXIS_RULES); path overrides (regex, per-layer spec)
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

def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class Range:
  """A number in [lo, hi] (bounds optional; `*_open` excludes them); `also`: values allowed besides."""
  kind: type = int
  lo: Optional[float] = None
  hi: Optional[float] = None
  lo_open: bool = False
  hi_open: bool = False
  also: tuple = ()
  note: str = ""

  def problem(self, v) -> Optional[str]:
    if self.kind is int:
      ok_type = _is_int(v)
    else:  # an int is a fine float (alpha=16); NaN and inf never are
      ok_type = (_is_int(v) or isinstance(v, float)) and math.isfinite(v)
    if ok_type and (v in self.also or self._inside(v)):
      return None
    return f"expected {self.describe()}"

  def _inside(self, v) -> bool:
    return ((self.lo is None or (v > self.lo if self.lo_open else v >= self.lo))
            and (self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)))

  def describe(self) -> str:
    what = "an int" if self.kind is int else "a finite float"
    if self.lo is not None and self.hi is not None:
      what += f" in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
    elif self.lo is not None:
      what += f" {'>' if self.lo_open else '>='} {self.lo:g}"
    elif self.hi is not None:
      what += f" {'<' if self.hi_open else '<='} {self.hi:g}"
    what += "".join(f" or {a}" for a in self.also)
    return what + (f" ({self.note})" if self.note else "")


def Int(lo=None, hi=None, also=(), note="") -> Range:
  return Range(int, lo, hi, also=also, note=note)


def Float(lo=None, hi=None, lo_open=False, hi_open=False, note="") -> Range:
  return Range(float, lo, hi, lo_open, hi_open, note=note)


def _live(options) -> list:
  return list(options() if callable(options) else options)


@dataclasses.dataclass(frozen=True)
class Choice:
  """One of `options`: a tuple, or a function returning the live table (a registry) so it cannot drift.
  `deprecated` names are accepted but not offered."""
  options: Any
  note: str = ""
  deprecated: Any = ()

  def allowed(self) -> list:
    return _live(self.options)

  def problem(self, v) -> Optional[str]:
    allowed = self.allowed()
    if isinstance(v, str) and (v in allowed or v in _live(self.deprecated)):
      return None
    names = [a if a else "''" for a in allowed]
    return (f"expected one of {', '.join(names)}" + (f" ({self.note})" if self.note else "")
            + _close(str(v), [a for a in allowed if a]))


@dataclasses.dataclass(frozen=True)
class Flag:
  def problem(self, v) -> Optional[str]:
    return None if isinstance(v, bool) else "expected a bool (true/false)"


@dataclasses.dataclass(frozen=True)
class Text:
  """A string; `nonempty` refuses ''. Free text (paths, names, reward specs) is checked where it is used."""
  nonempty: bool = False
  note: str = ""

  def problem(self, v) -> Optional[str]:
    if isinstance(v, str) and (v or not self.nonempty):
      return None
    return ("expected a non-empty string" if self.nonempty else "expected a string") + (
        f" ({self.note})" if self.note else "")


@dataclasses.dataclass(frozen=True)
class Template:
  """A prompt template: `str.format` with `{text}` as its one field (data.render_prompt)."""

  def problem(self, v) -> Optional[str]:
    try:
      fields = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None} if isinstance(v, str) else None
    except ValueError:
      fields = None
    if fields == {"text"}:
      return None
    return "expected a string with {text} as its only field (write a literal brace as {{ or }})"


@dataclasses.dataclass(frozen=True)
class Names:
  """A tuple (or list: JSON gives lists) of strings, at least `min_len` of them."""
  min_len: int = 0
  regex: bool = False  # each is a full-match regex (jft.rules)
  note: str = ""

  def problem(self, v) -> Optional[str]:
    if isinstance(v, (tuple, list)) and len(v) >= self.min_len and all(isinstance(s, str) for s in v):
      bad = [s for s in v if self.regex and _bad_regex(s)]
      if not bad:
        return None
      return f"{bad[0]!r} is not a valid regex: {_bad_regex(bad[0])}"
    size = f"at least {self.min_len} " if self.min_len else ""
    return f"expected a tuple of {size}strings" + (f" ({self.note})" if self.note else "")


def _bad_regex(pattern: str) -> Optional[str]:
  try:
    re.compile(pattern)
  except re.error as e:
    return str(e)
  return None


def _mesh_target_problem(target) -> Optional[str]:
  """None, a mesh axis, or a tuple of mesh axes (jft.sharding)."""
  axes = (target,) if isinstance(target, str) else target
  if target is None or (isinstance(axes, (tuple, list)) and all(a in sharding.AXES for a in axes)):
    return None
  return f"{target!r} is not a mesh axis ({', '.join(sharding.AXES)}), a tuple of them or None"


@dataclasses.dataclass(frozen=True)
class Pairs:
  """A tuple of (key, value) rules: `key` a regex or a name, `value` checked by `value_problem`."""
  what: str
  value_problem: Callable[[Any], Optional[str]]
  regex: bool = True

  def problem(self, v) -> Optional[str]:
    if not isinstance(v, (tuple, list)):
      return f"expected a tuple of {self.what}"
    for pair in v:
      if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)):
        return f"{pair!r}: expected a pair of {self.what}"
      bad = _bad_regex(pair[0]) if self.regex else None
      problem = f"{pair[0]!r} is not a valid regex: {bad}" if bad else self.value_problem(pair[1])
      if problem:
        return f"{pair!r}: {problem}"
    return None


def _bool_problem(v) -> Optional[str]:
  return None if isinstance(v, bool) else "expected a bool"


def _spec_problem(spec) -> Optional[str]:
  if not isinstance(spec, (tuple, list)):
    return "expected a spec: a tuple of mesh axes / tuples of them / None, one per array axis"
  return next(filter(None, map(_mesh_target_problem, spec)), None)


@dataclasses.dataclass(frozen=True)
class TokenIds:
  def problem(self, v) -> Optional[str]:
    if v is None or (isinstance(v, (tuple, list)) and v and all(_is_int(i) and i >= 0 for i in v)):
      return None
    return "expected None or a non-empty tuple of token ids (ints >= 0)"


@dataclasses.dataclass(frozen=True)
class Methods:
  """Compose's parts: method hyperparameter dicts, each naming its method (`{"method": "lora", ...}`).

  Empty is allowed here (configs/tiny.py:method=compose leaves the parts to the caller); Compose
  itself refuses an empty list when it is built.
  """

  def problem(self, v) -> Optional[str]:
    if not isinstance(v, (tuple, list)) or not all(isinstance(m, Mapping) for m in v):
      return "expected a tuple of method dicts ({'method': 'lora', 'rank': 8, ...})"
    for i, part in enumerate(v):
      part = dict(part)
      name = part.pop("method", None)
      bad_name = METHOD_NAME.problem(name)
      found = [f"method={name!r}: {bad_name}"] if bad_name else _method_problems(name, part, "")
      if found:
        return f"part {i}: {found[0].lstrip('.')}"
    return None


def _method_names() -> list[str]:
  return sorted(n for n, c in peft.METHODS.items() if c.standalone)


METHOD_NAME = Choice(_method_names, deprecated=lambda: peft.ALIASES)


# ---- The schema -----------------------------------------------------------------------------------

SCHEMA: dict[str, Any] = {
    "seed": Int(0),
    "model.name": Text(nonempty=True, note="an HF folder, a .gguf file or an embedded model name"),
    "model.dtype": Choice(DTYPES, note="the compute dtypes the model supports"),
    "model.remat": Choice(lambda: list(REMAT_POLICIES)),
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
    "optim.decay_rules": Pairs("(path regex, bool)", _bool_problem),
    "optim.clip_norm": Float(0, note="0 = no clipping"),
    "optim.grad_accum": Int(1),
    "eval.batch_size": Int(1),
    "eval.zero_shot": Flag(),
    "eval.zero_shot_split": Choice(("eval", "test"), note="zero-shot evaluation on data.eval_split or data.test_split"),
    "eval.exact_match": Flag(),
    "eval.metric": Text(nonempty=True, note="a metric the objective's evaluation reports"),
}

HPARAMS = ("method.hparams", "objective.hparams")  # subtrees checked per method / objective, below

# Method hyperparameters by name: a name means the same in every method that has it.
METHOD_HPARAMS: dict[str, Any] = {
    "targets": Names(regex=True, note="module names or full-match regexes"),
    "rank": Int(1),
    "alpha": Float(0, lo_open=True),
    "dropout": Float(0, 1, hi_open=True),
    "rslora": Flag(),
    "init_a": Choice(("kaiming", "gaussian", "pissa")),
    "dora": Flag(),
    "train": Names(regex=True),
    "freeze": Names(regex=True),
    "feedforward": Names(regex=True),
    "style": Choice(lambda: sorted(bottleneck.SITES)),
    "size": Int(1),
    "activation": Choice(lambda: sorted(bottleneck.ACTIVATIONS)),
    "init_std": Float(0),
    "decompose_both": Flag(),
    "decompose_factor": Int(1, also=(-1,), note="-1 = the most balanced factors"),
    "num_virtual_tokens": Int(1),
    "projection": Flag(),
    "encoder_hidden": Int(1),
    "init_from": Choice(("random", "vocab", "text")),
    "init_token_ids": TokenIds(),
    "encoder": Choice(("mlp", "lstm")),
    "d_initial": Float(0, lo_open=True),
    "methods": Methods(),
    "outputs": Int(1),
}


# Objective hyperparameters per objective (DPO's beta must be > 0, GRPO's may be 0: no KL term).
OBJECTIVE_HPARAMS: dict[str, dict[str, Any]] = {
    "sft": {},
    "classification": {},
    "lm": {},
    "instruct": {"samples_shown": Int(0), "max_new_tokens": Int(1)},
    "dpo": {"beta": Float(0, lo_open=True), "loss_type": Choice(lambda: align.PREFERENCE_LOSSES),
            "label_smoothing": Float(0, 0.5, hi_open=True)},
    "orpo": {"beta": Float(0, lo_open=True)},
    "kto": {"beta": Float(0, lo_open=True), "desirable_weight": Float(0, lo_open=True),
            "undesirable_weight": Float(0, lo_open=True)},
    "reward": {"source": Choice(lambda: reward_objective.SOURCES), "train_pairs": Int(1), "eval_pairs": Int(1),
               "margin_scale": Float(0), "min_diff": Float(0), "center_rewards": Float(0)},
    "grpo": {"reward": Text(note="a jft.rewards spec: run:DIR, module:function, file.py:function, vader"),
             "judge": Text(note="'' = none"), "group_size": Int(2), "max_new_tokens": Int(1),
             "temperature": Float(0, note="0 = greedy"), "top_k": Int(0, note="0 = off"), "epsilon": Float(0),
             "beta": Float(0, note="0 = no KL term, no reference model"),
             "loss_type": Choice(lambda: align.GRPO_LOSSES), "scale_rewards": Flag(),
             "prompt_words": Int(0, note="0 = the whole text"), "samples_shown": Int(0)},
}


# ---- Validation -----------------------------------------------------------------------------------

def _shown(v) -> str:
  text = repr(v)
  return text if len(text) <= 80 else text[:77] + "..."


def _method_problems(name, hparams: Mapping, where: str) -> list[str]:
  cls = peft.METHODS.get(peft.ALIASES.get(name, name))
  if cls is None:
    return []  # method.name's own rule reports it
  fields = [f.name for f in dataclasses.fields(cls)]
  out = []
  for key, value in hparams.items():
    path = f"{where}.{key}"
    if key not in fields:
      out.append(f"{path}: method {cls.name} has no hyperparameter {key!r}; valid: {', '.join(fields)}"
                 f"{_close(key, fields)}")
    elif value != REQUIRED:
      out += _rule_problem(path, METHOD_HPARAMS.get(key), value, "jft.schema.METHOD_HPARAMS")
  return out


def _objective_problems(name, hparams: Mapping) -> list[str]:
  if name not in objectives.OBJECTIVES:
    return []  # objective.name's own rule reports it
  fields = [f.name for f in dataclasses.fields(objectives.OBJECTIVES[name])]
  rules_ = OBJECTIVE_HPARAMS.get(name, {})
  out = []
  for key, value in hparams.items():
    path = f"objective.hparams.{key}"
    if key not in fields:
      out.append(f"{path}: objective {name} has no hyperparameter {key!r}"
                 + (f"; valid: {', '.join(fields)}{_close(key, fields)}" if fields else " (it has none)"))
    elif value != REQUIRED:
      out += _rule_problem(path, rules_.get(key), value, f"jft.schema.OBJECTIVE_HPARAMS[{name!r}]")
  return out


def _rule_problem(path: str, rule, value, table: str) -> list[str]:
  if rule is None:
    return [f"{path}: no rule in {table} (every field needs one; add it there)"]
  problem = rule.problem(value)
  return [f"{path}={_shown(value)}: {problem}"] if problem else []


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
                 "reads; every field is in jft.schema.SCHEMA)")
      continue
    out += _rule_problem(path, SCHEMA[path], value, "jft.schema.SCHEMA")
  if "method" in config and "hparams" in config.method:
    out += _method_problems(config.method.name, config.method.hparams.to_dict(), "method.hparams")
  if "objective" in config and "hparams" in config.objective:
    out += _objective_problems(config.objective.name, config.objective.hparams.to_dict())
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
    method = peft.build(config.method.name, **config.method.hparams.to_dict())
  except peft.MethodError as e:
    raise ConfigError(f"method.hparams: {e}") from None
  virtual = sum(getattr(m, "num_virtual_tokens", 0) for m in getattr(method, "methods", (method,)))
  why = f"data.max_length={config.data.max_length}"
  if virtual:
    why += f" + {virtual} virtual tokens ({method.name})"
  return config.data.max_length + virtual, why


def validate_against_model(config, model_config):
  """What needs the model's config (`jft.models.config.ModelConfig`, from metadata only, e.g.
  `jft.estimate.model_config(name)`): the longest row must fit the model's context. Call it before
  any weight is read."""
  longest, why = longest_sequence(config)
  context = model_config.max_position_embeddings
  if longest > context:
    raise ConfigError(f"{why} = {longest} positions exceeds the context of model {config.model.name} "
                      f"({context} positions, its max_position_embeddings); set data.max_length to at most "
                      f"{context - (longest - config.data.max_length)}")


# ---- Run folders written by an earlier jft --------------------------------------------------------

def upgrade(saved: Mapping) -> tuple[Any, list[str]]:
  """A run's saved `config.json` (a dict) -> (the config in today's layout, notes on what changed).

  Runs outlive the code that wrote them: `eval`, `export` and `--resume` read
  configs written before a field existed or moved. Fields that moved are
  moved (`data.task` -> `objective.name`), fields added since take their
  default, and fields this jft no longer reads are dropped; each is one note.
  The result is then checked with `problems` like any config.
  """
  import copy

  saved = copy.deepcopy(dict(saved))
  notes = []
  if "objective" not in saved and isinstance(saved.get("data"), dict) and "task" in saved["data"]:
    task = saved["data"].pop("task")
    saved["objective"] = {"name": task, "hparams": {}}
    notes.append(f"data.task={task!r} read as objective.name (the layout before objectives)")
  merged = default_config().to_dict()
  for hp in HPARAMS:  # saved hyperparameters replace the defaults whole (another method has other names)
    section, _ = hp.split(".")
    if isinstance(saved.get(section), dict) and isinstance(saved[section].get("hparams"), dict):
      merged[section]["hparams"] = saved[section].pop("hparams")
  kept = flat_keys(ml_collections.ConfigDict(saved))
  for path, value in kept.items():
    if path not in SCHEMA:
      notes.append(f"{path}={_shown(value)} ignored (not a field of this jft)")
      continue
    node = merged
    *parents, leaf = path.split(".")
    for key in parents:
      node = node[key]
    node[leaf] = value
  defaults = flat_keys(default_config())
  notes += [f"{path} missing; using the default {_shown(defaults[path])}" for path in SCHEMA if path not in kept]
  return ml_collections.ConfigDict(merged), notes
