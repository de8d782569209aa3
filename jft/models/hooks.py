"""The hook points: how a model runs leaves that a fine-tuning method added.

Models know no particular method. A method keeps its leaves under one key,
its *group*, inside the module it changes (`q_proj/lora/{a,b,scale}`,
`layers/self_attn/prefix/{keys,values}`, top-level `prompt/embeddings`). At
each hook point the model looks up the `Hook` registered for every group it
finds and calls the one function of that point:

    Linear      y = linear_final(bias + linear_output(x' @ W)),  x' = linear_input(x)
    Attention   attention_prefix -> extra keys/values seen by every query
    Attention, MLP   sublayer_output(h) before the residual add
    Transformer input_prefix -> vectors prepended to the token embeddings

A method is a `Hook` (the fine-tuning methods subclass it); defining one registers its
group. The hook the model calls is the configured instance in
`Settings.methods` when there is one (it carries dropout, activation...),
else the registered class's default.
"""

from __future__ import annotations

import functools
from typing import ClassVar

_GROUPS: dict[str, type] = {}


class HookError(ValueError):
  pass


class Hook:
  """What a method's leaves mean at the model's hook points; every default is "no effect".

  `p` is the method's group of leaves at that place (a dict), `module` the
  Flax module calling (its `dtype`, `settings`, `make_rng`).
  """
  group: ClassVar[str] = ""

  def linear_input(self, p, x, module):
    return x

  def linear_output(self, p, x, y, kernel, module):
    """Before the bias; `x` is the (hooked) input and `kernel` may be quantized."""
    return y

  def linear_final(self, p, y, module):
    """After the bias."""
    return y

  def sublayer_output(self, p, h, module):
    return h

  def attention_prefix(self, p):
    """-> (keys, values) `[..., n, kv_heads * head_dim]` before every sequence, or None."""
    return None

  def input_prefix(self, p):
    """-> vectors `[n, hidden]` prepended to the token embeddings, or None."""
    return None


def register(group: str, cls: type):
  same = lambda a, b: (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)  # a reloaded module
  if group in _GROUPS and not same(_GROUPS[group], cls):
    raise HookError(f"group {group!r} is registered twice ({_GROUPS[group].__name__}, {cls.__name__})")
  _GROUPS[group] = cls


def registered(group: str) -> bool:
  return group in _GROUPS


@functools.cache
def default(group: str) -> Hook:
  if not registered(group):
    raise HookError(f"no method registered the group {group!r}; registered: {sorted(_GROUPS)} (a model never "
                    "imports the methods: configure it with the method, `method.configure(model)`, or import "
                    "the methods' package first)")
  return _GROUPS[group]()


def groups(module, base: tuple = (), strict: bool = False) -> list[tuple[Hook, dict]]:
  """[(hook, leaves)] of the method groups in `module`'s params, in name order.

  `base` are the module's own leaves. With `strict`, any other key must be a
  registered group (a Linear holds nothing else), so a leaf no method knows
  (a typo, a tree from an older layout) is an error instead of silently unused.
  """
  params = module.variables.get("params", {})
  out = []
  for key in sorted(params):
    if key in base:
      continue
    if registered(key):
      out.append((module.settings.hook(key), params[key]))
    elif strict:
      raise HookError(f"{module.name}: {key!r} is neither one of {base} nor a method group "
                      f"(registered: {sorted(_GROUPS)})")
  return out


def input_prefix_length(params, settings) -> int:
  """Number of vectors a method prepends to the input (prompt tuning), from a top-level tree."""
  for key in sorted(params):
    if registered(key):
      prefix = settings.hook(key).input_prefix(params[key])
      if prefix is not None:
        return prefix.shape[-2]
  return 0
