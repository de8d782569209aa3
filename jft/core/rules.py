"""Path rules: the one regex mechanism over parameter paths.

A rule list is `[(regex, value), ...]` matched against `/`-joined parameter
paths such as `layers/self_attn/q_proj/kernel`. Matching is a *full* match
and the first matching rule wins, so `q_proj` never catches `q_proj_extra`.
Method targets, freezing, learning-rate groups, sharding specs and
quantization all use this module; nothing else in jft compiles a path regex.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

from jft.core.errors import JftError

Rules = Sequence[tuple[str, Any]]
NO_MATCH = object()


class RuleError(JftError, ValueError):
  """A rule matched nothing, or a path that must be covered matched no rule."""


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  """Nested dict -> {"a/b/c": leaf}. Only dicts are descended into."""
  out = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten(value, path + "/"))
    else:
      out[path] = value
  return out


def unflatten(flat: Mapping[str, Any]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = out
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return out


def _compile(rules: Rules):
  compiled = []
  for pattern, value in rules:
    try:
      compiled.append((pattern, re.compile(pattern), value))
    except re.error as e:
      raise RuleError(f"rule {pattern!r} is not a valid regex: {e}") from None
  return compiled


def nearest(pattern: str, paths: Iterable[str], n: int = 5) -> list[str]:
  """Paths that look most like a pattern (for error messages)."""
  paths = list(paths)
  close = difflib.get_close_matches(pattern, paths, n=n, cutoff=0.0)
  return close or paths[:n]


def match(rules: Rules, path: str, default: Any = NO_MATCH) -> Any:
  """Value of the first rule whose regex fully matches `path`."""
  for _, regex, value in _compile(rules):
    if regex.fullmatch(path):
      return value
  return default


def assign(rules: Rules, paths: Iterable[str], *, default: Any = NO_MATCH,
           require_all_rules_match: bool = True, what: str = "rule",
           labels: Sequence[str] | None = None) -> dict[str, Any]:
  """{path: value of the first matching rule} for every path.

  A path no rule matches gets `default`; without a default it is an error
  (coverage required). A rule that matches no path at all is an error when
  `require_all_rules_match` (the usual typo: `q_proj` where `.*/q_proj/kernel`
  was meant), naming the rule (or its entry in `labels`, as the user wrote it)
  and the nearest paths.
  """
  paths = list(paths)
  compiled = _compile(rules)
  used = [False] * len(compiled)
  out, uncovered = {}, []
  for path in paths:
    for i, (_, regex, value) in enumerate(compiled):
      if regex.fullmatch(path):
        used[i] = True
        out[path] = value
        break
    else:
      if default is NO_MATCH:
        uncovered.append(path)
      else:
        out[path] = default
  if require_all_rules_match:
    shown = list(labels) if labels is not None else [pattern for pattern, _, _ in compiled]
    unused = [label for label, u in zip(shown, used) if not u]
    if unused:
      hints = "; ".join(f"{p!r} (nearest paths: {', '.join(nearest(p, paths))})" for p in unused)
      raise RuleError(f"{what}(s) matched no parameter path (rules are full matches): {hints}")
  if uncovered:
    raise RuleError(f"{len(uncovered)} path(s) matched no {what}: {', '.join(uncovered[:10])}")
  return out


def map_tree(rules: Rules, tree: Mapping, fn: Callable[[str, Any, Any], Any] = None, **kw) -> dict:
  """Tree of rule values with the structure of `tree` (or `fn(path, leaf, value)`)."""
  flat = flatten(tree)
  values = assign(rules, flat, **kw)
  if fn is None:
    return unflatten(values)
  return unflatten({p: fn(p, flat[p], v) for p, v in values.items()})
