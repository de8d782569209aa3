"""Declarative maps between HF tensor names and jft parameter paths.

A family states one table of `Key(path, hf, convert, when)` rows. The generic
code in `hf.py` uses the same table in both directions (load and save), so a
family never writes a rename function. Rows whose `hf` name contains `{i}`
are per layer and are stacked on a leading axis under `layers/`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class Split:
  """This path is part `part` of `parts` equal slices of the HF tensor's last axis."""
  part: int
  parts: int


COPY = "copy"
TRANSPOSE = "transpose"  # torch nn.Linear stores (out, in); Flax kernels are (in, out)


@dataclasses.dataclass(frozen=True)
class Key:
  path: str
  hf: str
  convert: object = COPY  # COPY | TRANSPOSE | Split
  when: Optional[str] = None  # a ModelConfig field that must be truthy; "!field" negates

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.hf

  def applies(self, config) -> bool:
    if self.when is None:
      return True
    negate = self.when.startswith("!")
    value = bool(getattr(config, self.when.lstrip("!")))
    return value != negate

  def to_jft(self, array: np.ndarray) -> np.ndarray:
    if self.convert == TRANSPOSE:
      return array.T
    if isinstance(self.convert, Split):
      return np.split(array, self.convert.parts, axis=-1)[self.convert.part]
    return array

  def from_jft(self, array: np.ndarray) -> np.ndarray:
    """Inverse of `to_jft` (for Split, one part; `hf.py` concatenates the parts)."""
    return array.T if self.convert == TRANSPOSE else array


def active_keys(table, config):
  return [k for k in table if k.applies(config)]
