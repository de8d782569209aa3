"""What a fine-tuning method is, and everything derived from it once for all methods.

A method is a small frozen dataclass, and one file. Defining the class
registers it (by `name`, and its leaf `group` with the model's hook points).
It owns:

    group, leaves         where its leaves live and what each one is (`Leaf`:
                          trainable, takes weight decay, a constant, sharding axes)
    init(rng, params)     add its leaves (base paths unchanged)
    linear_output(...)... what its leaves do at the model's hook points (`jft.models.hooks`)
    materialize(params)   the tree the model sees (an encoder -> the prompt it makes)
    fold / unfold         merge into a kernel and back (`merge`/`unmerge` are derived)
    peft_*                its `peft` folder format, or `peft_type = None`
    recipe                a starting learning rate and hyperparameters for a small model

Derived here from those, for every method: the trainable/frozen split done
*before* `jax.grad` (frozen leaves are never differentiated), optax masks,
weight-decay masks, parameter counts and bytes, sharding axes, upgrades of
paths written by older versions. Trees are nested dicts; paths are
`/`-joined (see `jft.core.rules`).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import warnings
from typing import Any, ClassVar, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jft import quant
from jft.core import rules
from jft.core.fields import Choice, Float, Flag, Int, Names, TokenIds, field_problems
from jft.core.errors import JftError
from jft.models import hooks

Params = dict
METHODS: dict[str, type] = {}  # name -> class, filled by defining a Method subclass

# Hyperparameter rules by name (`jft.core.fields`): a name means the same in every method that has it.
# A method whose field is not here declares its rule beside the field, in its class (`hparam_rules`).
HPARAM_RULES: dict[str, Any] = {
    "targets": Names(regex=True, note="module names or full-match regexes"),
    "rank": Int(1),
    "alpha": Float(0, lo_open=True),
    "dropout": Float(0, 1, hi_open=True),
    "train": Names(regex=True),
    "freeze": Names(regex=True),
    "init_std": Float(0),
    "num_virtual_tokens": Int(1),
}
ALIASES: dict[str, str] = {}  # deprecated name -> name


class MethodError(JftError, ValueError):
  """A method cannot do what was asked (conflicting combination, merging a prefix...)."""


@dataclasses.dataclass(frozen=True)
class Leaf:
  """One kind of leaf a method adds, keyed by its name inside the method's group.

  `axes` names the leaf's trailing axes for sharding; "in" and "out" stand
  for the input and output axis of the kernel beside it, leading axes follow
  the kernel's (or are the layer axis under `layers/`); None = replicated.
  """
  trainable: bool = True
  decay: bool = True  # takes weight decay when the optimizer has some
  constant: bool = False  # a setting, not a weight (LoRA's scale): not counted as a parameter
  axes: Optional[tuple] = None


@dataclasses.dataclass(frozen=True)
class Method(hooks.Hook):
  """Base class. Subclasses set `name` (and `group`, `leaves`) and override what they need."""
  name: ClassVar[str] = "method"
  group: ClassVar[str] = ""  # key of its leaves inside the module it changes ("" = adds none)
  leaves: ClassVar[Mapping[str, Leaf]] = {}
  # (regex, replacement) on paths written by older versions of jft, applied on restore.
  legacy: ClassVar[tuple] = ()
  aliases: ClassVar[tuple] = ()  # deprecated names that still build this method
  recipe: ClassVar[dict] = {"lr": 1e-4}  # learning rate (+ hparams) for a small model, as in configs/sentiment.py
  peft_type: ClassVar[Optional[str]] = None  # the `peft` library's name for it; None = no equivalent
  # leaf -> (peft tensor suffix, "T" when torch stores it transposed) for per-module tensors.
  peft_tensors: ClassVar[Mapping[str, tuple]] = {}
  # init(base) computes the base model, so restoring a leaf's initial value removes the method there
  # (`jft ablate`'s layer and module ablations). False when init adds something (virtual tokens).
  init_is_base: ClassVar[bool] = True
  # False: a part other code composes in (the reward objective's `score_head`), not a method to pick alone.
  standalone: ClassVar[bool] = True
  # peft writes it as a whole module (`modules_to_save`) beside another method's adapter; that module's name.
  peft_module: ClassVar[Optional[str]] = None
  hparam_rules: ClassVar[Mapping[str, Any]] = {}  # rules of this method's own fields (beside HPARAM_RULES)

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    if "name" in cls.__dict__:
      if cls.name in METHODS and METHODS[cls.name].__qualname__ != cls.__qualname__:
        raise MethodError(f"method name {cls.name!r} is defined twice ({METHODS[cls.name].__module__}, "
                          f"{cls.__module__})")
      METHODS[cls.name] = cls
      ALIASES.update({alias: cls.name for alias in cls.__dict__.get("aliases", ())})
    if cls.__dict__.get("group"):
      hooks.register(cls.group, cls)

  # -- the tree ---------------------------------------------------------------

  def init(self, rng, params: Params) -> Params:
    return params

  def own(self, path: str) -> Optional[tuple[str, str, Leaf]]:
    """(module, leaf name, Leaf) when `path` is one of this method's leaves, else None."""
    if not self.group:
      return None
    parts = path.split("/")
    if self.group not in parts[:-1]:
      return None
    i = parts.index(self.group)
    spec = self.leaves.get(parts[i + 1])
    return None if spec is None else ("/".join(parts[:i]), parts[i + 1], spec)

  def is_trainable(self, path: str) -> bool:
    """THE predicate: which leaves train."""
    owned = self.own(path)
    return owned is not None and owned[2].trainable

  def decays(self, path: str) -> bool:
    owned = self.own(path)
    return owned is None or owned[2].decay

  def is_constant(self, path: str) -> bool:
    owned = self.own(path)
    return owned is not None and owned[2].constant

  def modules(self, params: Params) -> list[str]:
    """Paths of the modules holding this method's group (`""` for the top level)."""
    found = set()
    for path in rules.flatten(params):
      owned = self.own(path)
      if owned is not None:
        found.add(owned[0])
    return sorted(found)

  def configure(self, model):
    """The model with this method's hook settings (dropout, activation) installed."""
    if not self.group:
      return model
    return model.clone(settings=model.settings.with_method(self))

  def materialize(self, params: Params) -> Params:
    return params

  def hparams(self) -> dict:
    """Static hyperparameters, for run configs and exported adapter configs."""
    return {"method": self.name, **dataclasses.asdict(self)}

  def upgrade_path(self, path: str) -> str:
    for pattern, replacement in self.legacy:
      path = re.sub(pattern, replacement, path)
    return path

  def logical_axes(self, path: str, leaf, base_axes) -> tuple | None:
    """Logical axis names of a leaf this method added (None: not one of its leaves).

    `base_axes(path)` gives the axes of a base parameter, so a leaf follows the
    kernel it belongs to (LoRA's A takes the kernel's input axis, B its output
    axis). `jft.models.sharding` maps the names to mesh axes.
    """
    owned = self.own(path)
    if owned is None:
      return None
    module, _, spec = owned
    if spec.axes is None:
      return replicated_axes(leaf)
    kernel = base_axes(module + "/kernel") if module else None
    if any(a in ("in", "out") for a in spec.axes) and kernel is None:
      raise MethodError(f"{self.name}: {path} names a kernel axis but {module}/kernel has no axes")
    trailing = tuple({"in": kernel[-2], "out": kernel[-1]}.get(a, a) if kernel else a for a in spec.axes)
    n_lead = len(leaf.shape) - len(trailing)
    if kernel is not None and n_lead == len(kernel) - 2:
      lead = tuple(kernel[:-2])
    else:
      lead = ("layers",) * n_lead if n_lead == 1 and path.startswith("layers/") else (None,) * n_lead
    return (*lead, *trailing)

  # -- merging into the base weights -----------------------------------------

  def fold(self, p: dict, kernel, bias):
    """float32 kernel [..., in, out] (and bias) with this module's leaves `p` folded in.

    -> (kernel, bias, extra): `extra` is whatever `unfold` needs besides `p`.
    """
    raise MethodError(f"{self.name} cannot be merged into the base weights")

  def unfold(self, p: dict, extra: dict, kernel, bias):
    raise MethodError(f"{self.name} cannot be merged into the base weights")

  def merge(self, params: Params, requantize: bool = False):
    """-> (params with the method folded into its kernels, detached: what `unmerge` needs).

    A quantized base kernel becomes a dense float32 kernel (the merged weight is
    no longer on the 4-bit grid); with `requantize=True` it is quantized again
    in its format, which rounds the update onto that grid: close to, not equal
    to, the unmerged model.
    """
    params = self.materialize(params)
    flat = rules.flatten(params)
    modules = self.modules(params)
    if not modules:
      return params, {}
    if not all(m and m + "/kernel" in flat for m in modules):
      raise MethodError(f"{self.name} cannot be merged into the base weights (its leaves are not beside a kernel)")
    detached = {}
    for module in modules:
      node = get(params, module)
      p, kernel, bias = node[self.group], node["kernel"], node.get("bias")
      w, b, extra = self.fold(p, f32(quant.as_dense(kernel)), None if bias is None else f32(bias))
      for path in [q for q in flat if q.startswith(f"{module}/{self.group}/")]:
        del flat[path]
      detached[module] = {"leaves": p, "extra": extra, "bias": bias}
      if quant.is_quantized(kernel):
        detached[module]["base_kernel"] = kernel  # unmerge restores the quantized base exactly
        flat[module + "/kernel"] = (quant.quantize_array(w, kernel.fmt, kernel.blocksize, kernel.double_quant)
                                    if requantize else w)
      else:
        flat[module + "/kernel"] = w.astype(kernel.dtype)
      if bias is not None:
        flat[module + "/bias"] = b.astype(bias.dtype)
    return rules.unflatten(flat), detached

  def unmerge(self, merged: Params, detached) -> Params:
    flat = rules.flatten(merged)
    for module, d in detached.items():
      kernel = flat[module + "/kernel"]
      bias = flat.get(module + "/bias")
      w, b = self.unfold(d["leaves"], d["extra"], f32(quant.as_dense(kernel)), None if bias is None else f32(bias))
      flat[module + "/kernel"] = d["base_kernel"] if "base_kernel" in d else w.astype(kernel.dtype)
      if bias is not None:
        flat[module + "/bias"] = d["bias"]
      flat.update(rules.flatten({f"{module}/{self.group}": d["leaves"]}))
    return rules.unflatten(flat)

  # -- the peft library's folder format (see peft_format.py) ------------------

  def peft_config(self, params: Params) -> dict:
    """adapter_config.json fields of this method beyond the common ones."""
    raise MethodError(f"{self.name}: no peft equivalent")

  @classmethod
  def from_peft_config(cls, cfg: dict) -> "Method":
    raise MethodError(f"{cls.name}: no peft equivalent")

  def peft_export(self, params: Params, io) -> None:
    """Write this method's tensors through `io` (per-module tensors from `peft_tensors`)."""
    for module in self.modules(params):
      for leaf, value in get(params, module)[self.group].items():
        if leaf in self.peft_tensors:
          suffix, layout = self.peft_tensors[leaf]
          io.put(module, suffix, value, transpose=layout == "T")

  def peft_import(self, params: Params, io) -> dict:
    """{path: value} read through `io` onto the tree `init` made (same structure)."""
    out = {}
    for module in self.modules(params):
      for leaf, value in get(params, module)[self.group].items():
        if leaf in self.peft_tensors:
          suffix, layout = self.peft_tensors[leaf]
          out[f"{module}/{self.group}/{leaf}"] = io.take(module, suffix, value, transpose=layout == "T")
    return out


@dataclasses.dataclass(frozen=True)
class WeightDelta(Method):
  """A method whose leaves in a module make one update dW [..., in, out] of its kernel (LoHa, LoKr...):
  the Linear hook adds `x @ dW`, merging adds dW and unmerging subtracts it."""

  def delta(self, p: dict):
    raise NotImplementedError

  def linear_output(self, p, x, y, kernel, module):
    return y + jnp.dot(x, self.delta(p).astype(module.dtype))

  def fold(self, p, kernel, bias):
    return kernel + self.delta(p), bias, {}

  def unfold(self, p, extra, kernel, bias):
    return kernel - self.delta(p), bias


def build(name: str, **kwargs) -> Method:
  """A method from its registered name and hyperparameters, with named errors."""
  if name in ALIASES:
    warnings.warn(f"method name {name!r} is deprecated; use {ALIASES[name]!r}", DeprecationWarning, stacklevel=2)
    name = ALIASES[name]
  if name not in METHODS:
    close = difflib.get_close_matches(name, METHODS, n=3)
    raise MethodError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}"
                      + (f" (did you mean {', '.join(close)}?)" if close else ""))
  unknown = hparam_problems(name, kwargs, "", values=False)
  if unknown:
    raise MethodError("; ".join(unknown))
  return METHODS[name](**kwargs)


# `method.name`: a method that trains on its own (not a part only another method adds); old names accepted.
NAME_RULE = Choice(lambda: sorted(n for n, c in METHODS.items() if c.standalone), deprecated=lambda: ALIASES)


def hparam_problems(name: str, hparams: Mapping, where: str, values: bool = True) -> list[str]:
  """Every problem of a method's hyperparameters, one line each (`jft.core.fields.field_problems`):
  an unknown name, or (with `values`) a value its rule refuses. An unknown method has none here."""
  cls = METHODS.get(ALIASES.get(name, name))
  if cls is None:
    return []
  return field_problems(f"method {cls.name}", [f.name for f in dataclasses.fields(cls)],
                        {**HPARAM_RULES, **cls.hparam_rules} if values else None, hparams, where,
                        f"{cls.__module__}.{cls.__name__}.hparam_rules")


def module_names(modules: Sequence[str]) -> list[str]:
  """peft's `target_modules` for jft module paths: their last names."""
  return sorted({m.rsplit("/", 1)[-1] for m in modules})


def peft_targets(cfg: dict) -> tuple:
  """`target_modules` of a peft config; a string there is a full-match regex on module names."""
  targets = cfg["target_modules"]
  return (targets,) if isinstance(targets, str) else tuple(targets)


def from_hparams(hp: Mapping) -> Method:
  """Inverse of `Method.hparams()`: {"method": name, **fields}."""
  hp = dict(hp)
  if "method" not in hp:
    raise MethodError(f"method hyperparameters {hp} name no method (a 'method' key)")
  return build(hp.pop("method"), **hp)


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


def decay_mask(method: Method, trainable: Params) -> Params:
  """Bool tree: which trainable leaves the method lets take weight decay."""
  return rules.unflatten({p: method.decays(p) for p in rules.flatten(trainable)})


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
    if method.is_constant(path):
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
  """Paths of every base dict that holds a `kernel` (the Linear hook points; not methods' own layers)."""
  return sorted(p[: -len("/kernel")] for p in rules.flatten(params)
                if p.endswith("/kernel") and not any(hooks.registered(part) for part in p.split("/")[:-1]))


def select_modules(targets: Sequence[str], modules: Sequence[str], method: str) -> list[str]:
  """Modules matched by any target; a target matching nothing is an error naming it."""
  chosen = rules.assign([(expand_target(t), True) for t in targets], modules, default=False,
                        what=f"{method} target", labels=targets)
  return [m for m in modules if chosen[m]]


def target_kernels(method: Method, params: Params) -> list[tuple]:
  """[(module, kernel, lead axes, d_in, d_out)] of the linears `method.targets` selects."""
  out = []
  for module in select_modules(method.targets, linear_modules(params), method.name):
    kernel = get(params, module + "/kernel")
    out.append((module, kernel, stacked_shape(kernel), *kernel.shape[-2:]))
  return out


def get(params: Params, path: str):
  """The subtree at `path` ("" = the whole tree)."""
  node = params
  for part in path.split("/") if path else ():
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

@dataclasses.dataclass(frozen=True)
class Parts:
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
      bad_name = NAME_RULE.problem(name)
      found = [f"method={name!r}: {bad_name}"] if bad_name else hparam_problems(name, part, "")
      if found:
        return f"part {i}: {found[0].lstrip('.')}"
    return None


@dataclasses.dataclass(frozen=True)
class Compose(Method):
  """Several methods at once (LoRA + BitFit, LoRA + trainable norms...).

  A leaf is trainable if any part says so. Two parts adding the same leaf is
  a clear error at `init`, as is one part training a kernel that another
  adapts. Merging merges every part that can be merged. From a config:
  `method.name="compose"`, `method.hparams.methods=({"method": "lora", "rank": 8}, {"method": "bitfit"})`.
  """
  name: ClassVar[str] = "compose"
  hparam_rules: ClassVar[dict] = {"methods": Parts()}
  methods: tuple = ()

  def __post_init__(self):
    parts = tuple(m if isinstance(m, Method) else from_hparams(m) for m in self.methods)
    if not parts:
      raise MethodError("compose: needs at least one method in `methods`")
    object.__setattr__(self, "methods", parts)

  def init(self, rng, params):
    for i, m in enumerate(self.methods):
      params = m.init(jax.random.fold_in(rng, i), params)
    flat = rules.flatten(params)
    for path in flat:
      for m in self.methods:
        owned = m.own(path)
        if owned and owned[0] + "/kernel" in flat and self.is_trainable(owned[0] + "/kernel"):
          raise MethodError(f"conflicting methods {[m.name for m in self.methods]}: {owned[0]}/kernel is "
                            f"trained by one part while {m.name} adapts it")
    return params

  def own(self, path):
    return next((o for o in (m.own(path) for m in self.methods) if o is not None), None)

  def is_trainable(self, path):
    return any(m.is_trainable(path) for m in self.methods)

  def decays(self, path):
    return all(m.decays(path) for m in self.methods)

  def is_constant(self, path):
    return any(m.is_constant(path) for m in self.methods)

  def upgrade_path(self, path):
    for m in self.methods:
      path = m.upgrade_path(path)
    return path

  def configure(self, model):
    for m in self.methods:
      model = m.configure(model)
    return model

  def materialize(self, params):
    for m in self.methods:
      params = m.materialize(params)
    return params

  def merge(self, params, requantize: bool = False):
    detached = []
    for m in self.methods:
      params, d = m.merge(params, requantize)
      detached.append(d)
    return params, tuple(detached)

  def unmerge(self, merged, detached):
    for m, d in reversed(list(zip(self.methods, detached))):
      merged = m.unmerge(merged, d)
    return merged

  def hparams(self):
    return {"method": self.name, "methods": [m.hparams() for m in self.methods]}

  def logical_axes(self, path, leaf, base_axes):
    for m in self.methods:
      axes = m.logical_axes(path, leaf, base_axes)
      if axes is not None:
        return axes
    return None


def replicated_axes(leaf) -> tuple:
  """Axes that no rule splits (small method leaves: encoders, settings)."""
  return (None,) * len(leaf.shape)


def f32(x):
  return jnp.asarray(x, jnp.float32)
