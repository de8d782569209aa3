"""What a train step costs before running it: memory from the compiled step (XLA's own analysis)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jft import peft
from jft.step import make_train_step


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def step_memory(model, method, base, tx, batch: int, length: int) -> dict:
  """Bytes of the compiled train step for `method` on `base` (dense or quantized), batch x length tokens.

  Nothing is executed: the step is lowered with abstract inputs and compiled.
  """
  trainable, frozen = peft.split(method, method.init(jax.random.PRNGKey(0), base))
  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  compiled = make_train_step(model, method, tx).lower(
      _abstract(trainable), _abstract(tx.init(trainable)), _abstract(frozen),
      {"input_ids": tokens, "attention_mask": tokens}, jax.ShapeDtypeStruct((2,), jnp.uint32)).compile()
  return memory_of(compiled)


def memory_of(compiled) -> dict:
  """Per-device bytes of a compiled computation, from XLA's memory analysis.

  `total` = arguments + outputs + temporaries - donated (aliased) bytes.
  """
  m = compiled.memory_analysis()
  out = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
         "temporaries": m.temp_size_in_bytes, "aliased": m.alias_size_in_bytes}
  out["total"] = out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"]
  return out
