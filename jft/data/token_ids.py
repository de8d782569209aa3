"""Token ids against a model's vocabulary, checked on the host before they reach the model.

The embedding lookup (`jnp.take` in `layers.Embed`) does not raise on a bad id:
an id >= vocab_size (or < -vocab_size) reads a row of NaN, and through attention
every logit of its row is NaN; an id in -vocab_size..-1 silently reads a row
from the end of the table. `check_ids` is the cheap (one vectorized pass) check to run on ids from
outside: a tokenizer that is not the model's, added special tokens, a data file.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from jft.core.errors import JftError


class TokenIdError(JftError, ValueError):
  """A token id outside the model's vocabulary."""


def first_bad_id(ids, vocab_size: int) -> Optional[tuple[tuple[int, ...], int]]:
  """(index, id) of the first id of `ids` (any shape, row-major order) that is < 0 or >= vocab_size;
  None when all are inside. Concrete values only (numpy, lists, JAX arrays outside jit)."""
  a = np.asarray(ids)
  if a.size == 0:
    return None
  if a.dtype.kind not in "iu":
    raise TokenIdError(f"token ids must be integers, got an array of {a.dtype}")
  bad = a >= vocab_size
  if a.dtype.kind == "i":
    bad |= a < 0
  if not bad.any():
    return None
  index = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), a.shape))
  return index, int(a[index])


def describe_position(index: tuple[int, ...]) -> str:
  if len(index) == 1:
    return f"position {index[0]}"
  if len(index) == 2:
    return f"row {index[0]}, position {index[1]}"
  return f"index {index}"


def check_ids(ids, vocab_size: int, where: str = "input"):
  """Raise `TokenIdError` naming the first id of `ids` outside 0..vocab_size-1: which id, at which
  position (row and position for [batch, length] ids), and the vocabulary size. `where` starts the
  message (a file, a prompt). Run it on the host, before `model.apply`: inside the model such an
  id gives NaN logits (or, when negative, another token's embedding) without any error."""
  found = first_bad_id(ids, vocab_size)
  if found is not None:
    index, value = found
    at = f" at {describe_position(index)}" if index else ""
    raise TokenIdError(f"{where}: token id {value} is outside the model's vocabulary (0..{vocab_size - 1}, "
                       f"{vocab_size} tokens){at}")
