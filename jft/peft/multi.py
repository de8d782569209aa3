"""Several named adapters over one frozen base, in one tree.

    params                              params
      <base tree>             add ->      <base tree>
                                          adapters/<name>/<the method's leaves, sparse>

`activate(params, name)` gives the tree the model runs: the base plus that
adapter's leaves. `mixed_apply` runs a batch in which every example names
its own LoRA adapter: adapters are stacked (`LoRA.stack`), gathered per
example, and the model is `vmap`ped over examples, so the frozen base is
shared and each example sees only its adapter.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from jft.core import rules
from jft.peft import api
from jft.peft.lora import LoRA

ADAPTERS = "adapters"


def base_of(params):
  return {k: v for k, v in params.items() if k != ADAPTERS}


def names(params) -> list[str]:
  return sorted(params.get(ADAPTERS, {}))


def add(params, name: str, method: api.Method, rng=None, adapter=None):
  """Add adapter `name`: freshly initialised by `method`, or the given sparse tree."""
  if name in params.get(ADAPTERS, {}):
    raise api.MethodError(f"adapter {name!r} already exists; remove it first")
  base = base_of(params)
  if adapter is None:
    initialised = method.init(rng if rng is not None else jax.random.PRNGKey(0), base)
    before = set(rules.flatten(base))
    adapter = rules.unflatten({p: v for p, v in rules.flatten(initialised).items()
                               if p not in before or method.is_trainable(p)})
  return {**params, ADAPTERS: {**params.get(ADAPTERS, {}), name: adapter}}


def remove(params, name: str):
  _check(params, name)
  rest = {k: v for k, v in params[ADAPTERS].items() if k != name}
  return {**base_of(params), **({ADAPTERS: rest} if rest else {})}


def activate(params, name: str):
  """The tree the model runs with adapter `name` active (adapter leaves override the base's)."""
  _check(params, name)
  flat = rules.flatten(base_of(params))
  flat.update(rules.flatten(params[ADAPTERS][name]))
  return rules.unflatten(flat)


def _check(params, name):
  if name not in params.get(ADAPTERS, {}):
    raise api.MethodError(f"no adapter {name!r}; have {names(params)}")


def mixed_apply(model, params, adapter_names: Sequence[str], input_ids, attention_mask=None):
  """Logits for a batch where example i uses LoRA adapter `adapter_names[i]`."""
  order = names(params)
  for n in adapter_names:
    _check(params, n)
  index = jnp.asarray([order.index(n) for n in adapter_names])
  stacked = LoRA.stack([params[ADAPTERS][n] for n in order], order)
  per_example = jax.tree.map(lambda x: x[index], stacked)
  base = base_of(params)
  if attention_mask is None:
    attention_mask = jnp.ones_like(input_ids)

  def one(adapter, ids, mask):
    tree = rules.unflatten({**rules.flatten(base), **rules.flatten(adapter)})
    return model.apply({"params": tree}, ids[None], attention_mask=mask[None])[0]

  return jax.vmap(one)(per_example, input_ids, attention_mask)
