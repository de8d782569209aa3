"""What a training objective is, and the reference model every objective shares.

An objective is a small frozen dataclass, one file; defining the class
registers it by `name` (its fields are the config's `objective.hparams`). It owns
the parts of a stage of training, kept apart as gemma's DPO example keeps the
data transform, the loss and the frozen anchor:

    examples(data, tokenizer, split, limit)   a split's rows as this objective reads them
    rows(examples, tokenizer, data)           tokenized rows; `row_length`, `collate` make padded batches
    rollout(batch, forward, ...)              online objectives (GRPO): sample the step's batch from the policy
    loss(forward, batch)                      (scalar loss, metrics), inside the jitted step
    evaluate(forward, examples, ...)          metrics of a split, outside the step
    samples(forward, examples, ...)           a few generations shown in the summary (before/after)
    method(method)                            what trains: the configured method, or it plus a head

The step (`jft.run.step`) is built from an objective and an optimizer; language
modelling, SFT and classification-as-generation are objectives like DPO.

The reference model of DPO, KTO and RL's KL term is never a second copy of
the weights: it is the *base view* of the same tree, the frozen leaves without
any leaf the method owns (`base_view`), run through the same model.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from typing import Any, ClassVar, Optional

import jax

from jft import peft
from jft.core import progress, rules
from jft.core.errors import JftError
from jft.core.fields import field_problems

OBJECTIVES: dict[str, type] = {}  # name -> class, filled by defining an Objective subclass


class ObjectiveError(JftError, ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class Forward:
  """What a loss sees in the step: the policy's params and the models that run them.

  `model` trains (dropout on); `eval_model` is deterministic and runs the
  reference (`reference`: the base view, or None when the objective needs
  none). `trained` holds the paths of trainable leaves (the fused loss asks
  whether the output projection is one of them).
  """
  model: Any
  eval_model: Any
  params: Any
  reference: Any = None
  rng: Any = None
  trained: frozenset = frozenset()

  def apply(self, input_ids, attention_mask, **kwargs):
    rngs = {"dropout": self.rng} if self.rng is not None else {}
    return self.model.apply({"params": self.params}, input_ids, attention_mask=attention_mask, rngs=rngs, **kwargs)

  def apply_reference(self, input_ids, attention_mask, **kwargs):
    return self.eval_model.apply({"params": self.reference}, input_ids, attention_mask=attention_mask, **kwargs)


@dataclasses.dataclass(frozen=True)
class Objective:
  """Base class. Subclasses set `name` and override what they need."""
  name: ClassVar[str] = "objective"
  uses_reference: ClassVar[bool] = False  # the loss reads `Forward.reference`
  packable: ClassVar[bool] = False  # rows may be packed into one sequence (`data.pack`)
  online: ClassVar[bool] = False  # batches are sampled from the policy during training (`rollout`)
  hparam_rules: ClassVar[dict] = {}  # a rule (`jft.core.fields`) for each field: `objective.hparams` is checked by it

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    if "name" in cls.__dict__:
      OBJECTIVES[cls.name] = cls

  def __post_init__(self):
    """An objective built in Python is held to the rules a config's is (one check, `hparam_rules`)."""
    found = field_problems(f"objective {self.name}", [f.name for f in dataclasses.fields(self)], self.hparam_rules,
                           {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, "",
                           f"{type(self).__module__}.{type(self).__name__}.hparam_rules")
    if found:
      raise ObjectiveError(f"objective {self.name}: " + "; ".join(found))

  def method(self, method):
    return method

  def examples(self, data, tokenizer, split: str, limit: Optional[int]) -> list:
    raise NotImplementedError

  def rows(self, examples: list, tokenizer, data) -> list:
    raise NotImplementedError

  def rows_per_batch(self, batch_size: int) -> int:
    """Rows the data stream yields per step (GRPO: prompts, each completed several times)."""
    return batch_size

  def rollout(self, batch: dict, forward: Forward, tokenizer, seed: int, where: str) -> tuple[dict, dict]:
    """Online objectives: the data stream's batch -> (the step's batch, metrics), sampled from the policy."""
    return batch, {}

  def row_length(self, row) -> int:
    return len(row[0])

  def collate(self, rows: list, length: int, pad_id: int) -> dict:
    raise NotImplementedError

  def loss(self, forward: Forward, batch: dict):
    raise NotImplementedError

  def evaluate(self, config, forward: Forward, tokenizer, examples: list, mesh=None) -> dict:
    raise NotImplementedError

  def samples(self, config, forward: Forward, tokenizer, examples: list) -> list[dict]:
    """A few outputs of the model on held-out examples, for the run's summary (before and after training)."""
    return []

  def hparams(self) -> dict:
    return dataclasses.asdict(self)


@functools.partial(jax.jit, static_argnames=("objective", "model"))
def _batch_loss(objective, model, params, reference, batch):
  loss, metrics = objective.loss(Forward(model, model, params, reference), batch)
  return {"loss": loss, **metrics}


def mean_loss(objective: Objective, forward: Forward, rows: list, batch_size: int, pad_id: int = 0) -> dict:
  """The objective's loss and metrics on `rows`, in fixed order, averaged over rows (deterministic model).

  Objectives whose evaluation is their training loss (DPO, KTO...) use this.
  """
  totals, n = {}, 0
  for start in progress.track(range(0, len(rows), batch_size), -(-len(rows) // batch_size), "evaluating (batches)"):
    chunk = rows[start:start + batch_size]
    longest = max(map(objective.row_length, chunk))
    batch = objective.collate(chunk, -(-longest // 16) * 16, pad_id)
    out = jax.device_get(_batch_loss(objective, forward.eval_model, forward.params, forward.reference, batch))
    for k, v in out.items():
      totals[k] = totals.get(k, 0.0) + float(v) * len(chunk)
    n += len(chunk)
  return {k: v / max(n, 1) for k, v in totals.items()}


def build(name: str, **hparams) -> Objective:
  """An objective from its registered name and hyperparameters, with named errors."""
  if name not in OBJECTIVES:
    close = difflib.get_close_matches(name, OBJECTIVES, n=3)
    raise ObjectiveError(f"unknown objective {name!r}; available: {', '.join(sorted(OBJECTIVES))}"
                         + (f" (did you mean {', '.join(close)}?)" if close else ""))
  unknown = hparam_problems(name, hparams, "", values=False)
  if unknown:
    raise ObjectiveError("; ".join(unknown))
  return OBJECTIVES[name](**hparams)


def hparam_problems(name: str, hparams, where: str, values: bool = True) -> list[str]:
  """Every problem of an objective's hyperparameters, one line each (`jft.core.fields.field_problems`):
  an unknown name, or (with `values`) a value the objective's own rule refuses."""
  cls = OBJECTIVES.get(name)
  if cls is None:
    return []  # objective.name's own rule reports it
  return field_problems(f"objective {name}", [f.name for f in dataclasses.fields(cls)],
                        cls.hparam_rules if values else None, hparams, where,
                        f"{cls.__module__}.{cls.__name__}.hparam_rules")


def default_hparams(name: str) -> dict:
  """Every hyperparameter of an objective with its default: a config lists them all, so any one can be
  overridden on the command line (`--config.objective.hparams.beta=0.2`)."""
  build(name)  # a named error for an unknown objective
  return {f.name: f.default for f in dataclasses.fields(OBJECTIVES[name])}


def from_config(config) -> Objective:
  """The run's objective: `objective.name` + `objective.hparams`; run folders written before
  objectives existed name it as `data.task`."""
  if "objective" in config:
    return build(config.objective.name, **config.objective.hparams.to_dict())
  return build(config.data.task)


def method_of(config):
  """The run's method: `method.name` + `method.hparams`, plus what the objective adds (the reward
  model's score head). Everything that builds a run's method from its config calls this."""
  return from_config(config).method(peft.build(config.method.name, **config.method.hparams.to_dict()))


def base_view(method, frozen):
  """The reference model's params: the frozen leaves the method does not own, the same arrays (no copy).

  With every method group gone the model runs the base. Frozen leaves are
  never differentiated, and losses put `stop_gradient` on reference outputs.
  """
  return rules.unflatten({p: v for p, v in rules.flatten(frozen).items() if method.own(p) is None})


def check_base_view(method, base_paths, trainable_paths, objective: Objective):
  """A base view exists only when training changes no base leaf: full fine-tuning (or BitFit on a
  model with biases) trains the base itself, so its reference would need a second copy."""
  trained_base = sorted(set(base_paths) & set(trainable_paths))
  if objective.uses_reference and trained_base:
    raise ObjectiveError(
        f"objective {objective.name} needs the reference model, which jft computes from the base with the "
        f"method's leaves switched off; method {method.name} trains base weights ({trained_base[0]}, ... "
        f"{len(trained_base)} in all), so no reference is left. Use an adapter method (lora, dora, ia3...), "
        f"or start from an earlier run with --init-from")
