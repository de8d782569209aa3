"""The search-space language of a config file's `sweep(arg)`: what to vary and how (see
`jft.studies.sweep`). Light on purpose: a config file imports it, and loading a config loads no JAX.

    from jft.studies.space import Space, grid, loguniform

    def sweep(arg=None):
      return Space({"method.hparams.rank": grid(4, 8), "optim.lr": loguniform(1e-4, 3e-3)}, trials=8)
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Sequence

import numpy as np

from jft.core.errors import JftError


class SweepError(JftError, ValueError):
  pass


# ----------------------------------------------------------------------------
# The space
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Dim:
  """One swept field: `kind` grid | choice (values) or uniform | loguniform | integer (low, high)."""
  kind: str
  values: tuple = ()
  low: float = 0.0
  high: float = 0.0

  @property
  def discrete(self) -> bool:
    return self.kind in ("grid", "choice")

  @property
  def log(self) -> bool:
    """Whether the values are best read on a log axis."""
    if self.kind == "loguniform":
      return True
    nums = [v for v in self.values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return len(nums) == len(self.values) > 1 and min(nums) > 0 and max(nums) / min(nums) >= 10

  def sample(self, rng: np.random.RandomState):
    if self.discrete:
      return self.values[rng.randint(len(self.values))]
    if self.kind == "uniform":
      return float(rng.uniform(self.low, self.high))
    if self.kind == "loguniform":
      return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
    return int(rng.randint(int(self.low), int(self.high) + 1))

  def suggest(self, trial, name: str):
    """The value Optuna's sampler proposes for this dimension."""
    if self.discrete:
      i = trial.suggest_categorical(name, list(range(len(self.values))))  # index: any value type works
      return self.values[i]
    if self.kind == "integer":
      return trial.suggest_int(name, int(self.low), int(self.high))
    return trial.suggest_float(name, self.low, self.high, log=self.kind == "loguniform")


def grid(*values) -> Dim:
  """Every value, crossed with the other grid dimensions."""
  return Dim("grid", tuple(values))


def choice(*values) -> Dim:
  """One of the values, drawn uniformly (enumerated by grid search)."""
  return Dim("choice", tuple(values))


def uniform(low: float, high: float) -> Dim:
  return Dim("uniform", low=float(low), high=float(high))


def loguniform(low: float, high: float) -> Dim:
  return Dim("loguniform", low=float(low), high=float(high))


def integer(low: int, high: int) -> Dim:
  """An integer in [low, high], both included."""
  return Dim("integer", low=int(low), high=int(high))


@dataclasses.dataclass(frozen=True)
class Space:
  """Dimensions by key (`a.b.c` field or `arg:NAME`); `trials` = points for random/Optuna search."""
  dims: dict
  trials: int = 0


def check_space(spaces: Sequence[Space], where: str):
  if not spaces or any(not isinstance(s, Space) for s in spaces):
    raise SweepError(f"{where}: sweep() must return a jft.studies.space.Space or a non-empty list of them")
  for s in spaces:
    if not s.dims:
      raise SweepError(f"{where}: a sweep space has no dimensions")
    for key, dim in s.dims.items():
      if not isinstance(dim, Dim):
        raise SweepError(f"{where}: {key!r} = {dim!r}; use grid(...), choice(...), uniform(...), "
                         "loguniform(...) or integer(...)")
      if dim.discrete and not dim.values:
        raise SweepError(f"{where}: {key!r} has no values")
      if not dim.discrete and not dim.low < dim.high:
        raise SweepError(f"{where}: {key!r}: {dim.kind}({dim.low}, {dim.high}) needs low < high")
      if dim.kind == "loguniform" and dim.low <= 0:
        raise SweepError(f"{where}: {key!r}: loguniform needs low > 0")


# ----------------------------------------------------------------------------
# Points
# ----------------------------------------------------------------------------

def plan(spaces: Sequence[Space], search: str, trials: int = 0, seed: int = 0) -> list[dict]:
  """The points of a grid or random search, in a fixed order (the same on every machine)."""
  if search == "grid":
    points = []
    for s in spaces:
      for key, dim in s.dims.items():
        if not dim.discrete:
          raise SweepError(f"--search grid: {key!r} is {dim.kind}({dim.low}, {dim.high}); grid search needs "
                           "grid(...) or choice(...) values (use --search random or optuna for distributions)")
      keys = list(s.dims)
      points += [dict(zip(keys, combo)) for combo in itertools.product(*(s.dims[k].values for k in keys))]
    return points
  if search == "random":
    n = trials or sum(s.trials for s in spaces)
    if n < 1:
      raise SweepError("--search random: how many points? pass --trials N (or set Space(..., trials=N))")
    rng = np.random.RandomState(seed)
    points = []
    for _ in range(n):
      s = spaces[rng.randint(len(spaces))]
      points.append({k: d.sample(rng) for k, d in s.dims.items()})
    return points
  raise SweepError(f"--search {search!r}: expected grid, random or optuna")


def probes(spaces: Sequence[Space], seed: int) -> list[dict]:
  """Points that try every listed value of every space once (sampled values elsewhere): enough to
  catch an unknown field or a value of the wrong type before a random or Optuna search starts."""
  rng = np.random.RandomState(seed)
  out = []
  for s in spaces:
    sample = {k: d.sample(rng) for k, d in s.dims.items()}
    out.append(sample)
    out += [{**sample, k: v} for k, d in s.dims.items() if d.discrete for v in d.values]
  return out
