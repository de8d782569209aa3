"""Several named adapters over one frozen base, in one tree.

    params                              params
      <base tree>             add ->      <base tree>
                                          adapters/<name>/<the method's leaves, sparse>

`activate(params, name)` gives the tree the model runs: the base plus that
adapter's leaves. `mixed_apply` runs a batch in which every example names
its own LoRA adapter: adapters are zero-padded to a common rank, gathered per
example, and the model is `vmap`ped over examples, so the frozen base is
shared and each example sees only its adapter.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from jft import rules
from jft.peft import api

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


def stack_lora(adapters: Mapping[str, dict], order: Sequence[str]):
  """LoRA adapters -> one tree with a leading adapter axis, zero-padded to a common rank.

  A module one adapter does not target gets zeros there (a no-op for it).
  """
  flats = [rules.flatten(adapters[n]) for n in order]
  modules = sorted({p[: -len("/lora_a")] for f in flats for p in f if p.endswith("/lora_a")})
  for f, n in zip(flats, order):
    if any(p.endswith("/lora_magnitude") for p in f):
      raise api.MethodError(f"mixed-batch inference supports plain LoRA; {n!r} is DoRA (merge it instead)")
  rank = max(f[m + "/lora_a"].shape[-1] for f in flats for m in modules if m + "/lora_a" in f)
  stacked = {}
  for m in modules:
    ref = next(f for f in flats if m + "/lora_a" in f)
    a_shape, b_shape = ref[m + "/lora_a"].shape, ref[m + "/lora_b"].shape
    a_list, b_list, s_list = [], [], []
    for f in flats:
      if m + "/lora_a" in f:
        a, b, s = f[m + "/lora_a"], f[m + "/lora_b"], f[m + "/lora_scale"]
        pad = rank - a.shape[-1]
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)])
        b = jnp.pad(b, [(0, 0)] * (b.ndim - 2) + [(0, pad), (0, 0)])
      else:
        a = jnp.zeros((*a_shape[:-1], rank))
        b = jnp.zeros((*b_shape[:-2], rank, b_shape[-1]))
        s = jnp.zeros(ref[m + "/lora_scale"].shape)
      a_list.append(a), b_list.append(b), s_list.append(s)
    stacked[m + "/lora_a"] = jnp.stack(a_list)
    stacked[m + "/lora_b"] = jnp.stack(b_list)
    stacked[m + "/lora_scale"] = jnp.stack(s_list)
  return rules.unflatten(stacked)


def mixed_apply(model, params, adapter_names: Sequence[str], input_ids, attention_mask=None):
  """Logits for a batch where example i uses LoRA adapter `adapter_names[i]`."""
  order = names(params)
  for n in adapter_names:
    _check(params, n)
  index = jnp.asarray([order.index(n) for n in adapter_names])
  stacked = stack_lora(params[ADAPTERS], order)
  per_example = jax.tree.map(lambda x: x[index], stacked)
  base = base_of(params)
  if attention_mask is None:
    attention_mask = jnp.ones_like(input_ids)

  def one(adapter, ids, mask):
    tree = rules.unflatten({**rules.flatten(base), **rules.flatten(adapter)})
    return model.apply({"params": tree}, ids[None], attention_mask=mask[None])[0]

  return jax.vmap(one)(per_example, input_ids, attention_mask)
