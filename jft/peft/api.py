"""The generic half of every fine-tuning method.

A method is a small frozen dataclass with pure functions on the param tree:

    init(rng, params) -> params        add the method's leaves (base paths unchanged)
    is_trainable(path) -> bool         THE predicate: which leaves train
    configure(model) -> model          static hook settings (dropout, activation)
    materialize(params) -> params      the tree the model sees (e.g. prefix encoder -> prefix)
    merge(params) -> (merged, adapter) / unmerge(merged, adapter) -> params
    logical_axes(path, leaf, base_axes) -> axis names of a leaf it adds (sharding)

Everything else is derived here from the predicate, once, for every method:
the trainable/frozen split done *before* `jax.grad` (frozen leaves are never
differentiated), optax masks and labels, parameter counts and byte sizes.
Trees are nested dicts; paths are `/`-joined (see `jft.rules`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jft import rules
from jft.errors import JftError

Params = dict


class MethodError(JftError, ValueError):
  """A method cannot do what was asked (conflicting combination, merging a prefix...)."""


@dataclasses.dataclass(frozen=True)
class Method:
  """Base class. Subclasses set `name` and override what they need."""
  name: ClassVar[str] = "method"
  # Frozen leaves a method adds that are settings, not weights (LoRA's scale):
  # excluded from parameter counts.
  constants: ClassVar[tuple[str, ...]] = ()

  def init(self, rng, params: Params) -> Params:
    return params

  def is_trainable(self, path: str) -> bool:
    raise NotImplementedError

  def configure(self, model):
    return model

  def materialize(self, params: Params) -> Params:
    return params

  def merge(self, params: Params):
    raise MethodError(f"{self.name} cannot be merged into the base weights")

  def unmerge(self, merged: Params, adapter: Params) -> Params:
    raise MethodError(f"{self.name} cannot be merged into the base weights")

  def hparams(self) -> dict:
    """Static hyperparameters, for run configs and exported adapter configs."""
    return {"method": self.name, **dataclasses.asdict(self)}

  def logical_axes(self, path: str, leaf, base_axes) -> tuple | None:
    """Logical axis names of a leaf this method added (None: not one of its leaves).

    `base_axes(path)` gives the axes of a base parameter, so a leaf can follow
    the kernel it belongs to (LoRA's A takes the kernel's input axis, B its
    output axis). `jft.sharding` maps the names to mesh axes.
    """
    return None


# ----------------------------------------------------------------------------
# Derived from the predicate
# ----------------------------------------------------------------------------

def trainable_paths(method: Method, params: Params) -> list[str]:
  return [p for p in rules.flatten(params) if method.is_trainable(p)]


def split(method: Method, params: Params) -> tuple[Params, Params]:
  """-> (trainable, frozen): two sparse trees that `combine` puts back together."""
  flat = rules.flatten(params)
  trainable = {p: v for p, v in flat.items() if method.is_trainable(p)}
  frozen = {p: v for p, v in flat.items() if p not in trainable}
  return rules.unflatten(trainable), rules.unflatten(frozen)


def combine(*trees: Params) -> Params:
  """Deep merge of disjoint sparse trees (inverse of `split`)."""
  flat: dict = {}
  for tree in trees:
    for path, value in rules.flatten(tree).items():
      if path in flat:
        raise MethodError(f"combine: {path} is in more than one tree")
      flat[path] = value
  return rules.unflatten(flat)


def mask(method: Method, params: Params) -> Params:
  """Bool tree for `optax.masked` (True = trainable)."""
  return rules.unflatten({p: method.is_trainable(p) for p in rules.flatten(params)})


def labels(method: Method, params: Params) -> Params:
  """"trainable"/"frozen" tree for `optax.partition`."""
  return rules.unflatten({p: "trainable" if method.is_trainable(p) else "frozen"
                          for p in rules.flatten(params)})


@dataclasses.dataclass(frozen=True)
class ParamCount:
  total: int
  trainable: int
  trainable_bytes: int

  @property
  def percent(self) -> float:
    return 100.0 * self.trainable / self.total

  def __str__(self):
    return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {self.percent:.4f} || trainable state: {self.trainable_bytes / 2**20:.2f} MiB")


def count(method: Method, params: Params) -> ParamCount:
  """Parameter counts; trainable bytes assume float32 trainable state (as trained)."""
  total = trainable = 0
  for path, leaf in rules.flatten(params).items():
    if path.rsplit("/", 1)[-1] in method.constants and not method.is_trainable(path):
      continue
    n = int(np.prod(leaf.shape))
    total += n
    if method.is_trainable(path):
      trainable += n
  return ParamCount(total, trainable, 4 * trainable)


# ----------------------------------------------------------------------------
# Targets: which modules a method touches
# ----------------------------------------------------------------------------

def expand_target(target: str) -> str:
  """A bare module name (`q_proj`) means that module anywhere: `(.*/)?q_proj`.

  Matching stays a full match, so `q_proj` never selects `q_proj_extra`.
  Targets containing `/` or regex syntax are used as written.
  """
  if "/" in target or any(ch in target for ch in "()[]|*+?.\\^$"):
    return target
  return rf"(.*/)?{target}"


def linear_modules(params: Params) -> list[str]:
  """Paths of every dict that holds a `kernel` (the Linear hook points)."""
  return sorted(p[: -len("/kernel")] for p in rules.flatten(params) if p.endswith("/kernel"))


def select_modules(targets: Sequence[str], modules: Sequence[str], method: str) -> list[str]:
  """Modules matched by any target; a target matching nothing is an error naming it."""
  chosen = rules.assign([(expand_target(t), True) for t in targets], modules, default=False,
                        what=f"{method} target", labels=targets)
  return [m for m in modules if chosen[m]]


def get(params: Params, path: str):
  node = params
  for part in path.split("/"):
    node = node[part]
  return node


def with_leaves(params: Params, additions: Mapping[str, Any], method: str) -> Params:
  """Copy of `params` with new leaves added; adding an existing path is a conflict."""
  flat = rules.flatten(params)
  for path in additions:
    if path in flat:
      raise MethodError(f"{method}: {path} already exists (two methods target the same leaf?)")
  return rules.unflatten({**flat, **additions})


def stacked_shape(kernel) -> tuple:
  """Leading axes of a kernel (the scanned layer axis, or none)."""
  return tuple(kernel.shape[:-2])


# ----------------------------------------------------------------------------
# Composition
# ----------------------------------------------------------------------------

REPARAMETERISING = ("lora_a", "ia3_in", "ia3_out")


@dataclasses.dataclass(frozen=True)
class Compose(Method):
  """Several methods at once (LoRA + BitFit, LoRA + trainable norms...).

  A leaf is trainable if any part says so. Two parts adding the same leaf is
  a clear error at `init`. Merging merges every part that can be merged.
  """
  name: ClassVar[str] = "compose"
  methods: tuple = ()

  def init(self, rng, params):
    for i, m in enumerate(self.methods):
      params = m.init(jax.random.fold_in(rng, i), params)
    # A weight that one part reparameterises (LoRA, DoRA, IA3) must stay frozen.
    flat = rules.flatten(params)
    for path in flat:
      module, leaf = path.rsplit("/", 1) if "/" in path else ("", path)
      if leaf in REPARAMETERISING and self.is_trainable(module + "/kernel"):
        raise MethodError(f"conflicting methods {[m.name for m in self.methods]}: {module}/kernel is "
                          f"trained by one part while another adapts it through {leaf}")
    return params

  def is_trainable(self, path):
    return any(m.is_trainable(path) for m in self.methods)

  @property
  def constants(self):  # type: ignore[override]
    return tuple(c for m in self.methods for c in m.constants)

  def configure(self, model):
    for m in self.methods:
      model = m.configure(model)
    return model

  def materialize(self, params):
    for m in self.methods:
      params = m.materialize(params)
    return params

  def merge(self, params):
    adapters = []
    for m in self.methods:
      params, adapter = m.merge(params)
      adapters.append(adapter)
    return params, tuple(adapters)

  def unmerge(self, merged, adapter):
    for m, a in reversed(list(zip(self.methods, adapter))):
      merged = m.unmerge(merged, a)
    return merged

  def hparams(self):
    return {"method": self.name, "parts": [m.hparams() for m in self.methods]}

  def logical_axes(self, path, leaf, base_axes):
    for m in self.methods:
      axes = m.logical_axes(path, leaf, base_axes)
      if axes is not None:
        return axes
    return None


def module_axes(path: str, base_axes) -> tuple | None:
  """Axes of the kernel beside a leaf (`.../q_proj/lora_a` -> those of `.../q_proj/kernel`)."""
  return base_axes(path.rsplit("/", 1)[0] + "/kernel") if "/" in path else None


def replicated_axes(leaf) -> tuple:
  """Axes that no rule splits (small method leaves: encoders, settings)."""
  return (None,) * len(leaf.shape)


def f32(x):
  return jnp.asarray(x, jnp.float32)
