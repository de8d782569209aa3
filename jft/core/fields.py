"""What a config field may hold: the rule types every part of jft declares beside its own fields.

A rule has `problem(value) -> None | str` (what is wrong and what is allowed).
`jft.config.schema` holds the rules of the config's sections; each method
(`jft.peft`) and objective (`jft.objectives`) declares the rules of its own
hyperparameters in its class (`rules`), and `field_problems` checks a dict of
them the one way: an unknown name (with the closest valid names) or a value
its rule refuses.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import string
from typing import Any, Callable, Iterable, Mapping, Optional

REQUIRED = "???"  # a string field that must be set before a run


def close(key: str, names: Iterable[str]) -> str:
  """' (did you mean a, b?)' for the names closest to `key`, or ''."""
  found = difflib.get_close_matches(key, list(names), n=3, cutoff=0.5)
  return f" (did you mean {', '.join(found)}?)" if found else ""


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class Range:
  """A number in [lo, hi] (bounds optional; `*_open` excludes them); `also`: values allowed besides."""
  kind: type = int
  lo: Optional[float] = None
  hi: Optional[float] = None
  lo_open: bool = False
  hi_open: bool = False
  also: tuple = ()
  note: str = ""

  def problem(self, v) -> Optional[str]:
    if self.kind is int:
      ok_type = _is_int(v)
    else:  # an int is a fine float (alpha=16); NaN and inf never are
      ok_type = (_is_int(v) or isinstance(v, float)) and math.isfinite(v)
    if ok_type and (v in self.also or self._inside(v)):
      return None
    return f"expected {self.describe()}"

  def _inside(self, v) -> bool:
    return ((self.lo is None or (v > self.lo if self.lo_open else v >= self.lo))
            and (self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)))

  def describe(self) -> str:
    what = "an int" if self.kind is int else "a finite float"
    if self.lo is not None and self.hi is not None:
      what += f" in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
    elif self.lo is not None:
      what += f" {'>' if self.lo_open else '>='} {self.lo:g}"
    elif self.hi is not None:
      what += f" {'<' if self.hi_open else '<='} {self.hi:g}"
    what += "".join(f" or {a}" for a in self.also)
    return what + (f" ({self.note})" if self.note else "")


def Int(lo=None, hi=None, also=(), note="") -> Range:
  return Range(int, lo, hi, also=also, note=note)


def Float(lo=None, hi=None, lo_open=False, hi_open=False, note="") -> Range:
  return Range(float, lo, hi, lo_open, hi_open, note=note)


def _live(options) -> list:
  return list(options() if callable(options) else options)


@dataclasses.dataclass(frozen=True)
class Choice:
  """One of `options`: a tuple, or a function returning the live table (a registry) so it cannot drift.
  `deprecated` names are accepted but not offered."""
  options: Any
  note: str = ""
  deprecated: Any = ()

  def allowed(self) -> list:
    return _live(self.options)

  def problem(self, v) -> Optional[str]:
    allowed = self.allowed()
    if isinstance(v, str) and (v in allowed or v in _live(self.deprecated)):
      return None
    names = [a if a else "''" for a in allowed]
    return (f"expected one of {', '.join(names)}" + (f" ({self.note})" if self.note else "")
            + close(str(v), [a for a in allowed if a]))


@dataclasses.dataclass(frozen=True)
class Flag:
  def problem(self, v) -> Optional[str]:
    return None if isinstance(v, bool) else "expected a bool (true/false)"


@dataclasses.dataclass(frozen=True)
class Text:
  """A string; `nonempty` refuses ''. Free text (paths, names, reward specs) is checked where it is used."""
  nonempty: bool = False
  note: str = ""

  def problem(self, v) -> Optional[str]:
    if isinstance(v, str) and (v or not self.nonempty):
      return None
    return ("expected a non-empty string" if self.nonempty else "expected a string") + (
        f" ({self.note})" if self.note else "")


@dataclasses.dataclass(frozen=True)
class Template:
  """A prompt template: `str.format` with `{text}` as its one field (data.render_prompt)."""

  def problem(self, v) -> Optional[str]:
    try:
      fields = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None} if isinstance(v, str) else None
    except ValueError:
      fields = None
    if fields == {"text"}:
      return None
    return "expected a string with {text} as its only field (write a literal brace as {{ or }})"


@dataclasses.dataclass(frozen=True)
class Names:
  """A tuple (or list: JSON gives lists) of strings, at least `min_len` of them."""
  min_len: int = 0
  regex: bool = False  # each is a full-match regex (jft.core.rules)
  note: str = ""

  def problem(self, v) -> Optional[str]:
    if isinstance(v, (tuple, list)) and len(v) >= self.min_len and all(isinstance(s, str) for s in v):
      bad = [s for s in v if self.regex and bad_regex(s)]
      if not bad:
        return None
      return f"{bad[0]!r} is not a valid regex: {bad_regex(bad[0])}"
    size = f"at least {self.min_len} " if self.min_len else ""
    return f"expected a tuple of {size}strings" + (f" ({self.note})" if self.note else "")


def bad_regex(pattern: str) -> Optional[str]:
  try:
    re.compile(pattern)
  except re.error as e:
    return str(e)
  return None


@dataclasses.dataclass(frozen=True)
class Pairs:
  """A tuple of (key, value) rules: `key` a regex or a name, `value` checked by `value_problem`."""
  what: str
  value_problem: Callable[[Any], Optional[str]]
  regex: bool = True

  def problem(self, v) -> Optional[str]:
    if not isinstance(v, (tuple, list)):
      return f"expected a tuple of {self.what}"
    for pair in v:
      if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)):
        return f"{pair!r}: expected a pair of {self.what}"
      bad = bad_regex(pair[0]) if self.regex else None
      problem = f"{pair[0]!r} is not a valid regex: {bad}" if bad else self.value_problem(pair[1])
      if problem:
        return f"{pair!r}: {problem}"
    return None


def bool_problem(v) -> Optional[str]:
  return None if isinstance(v, bool) else "expected a bool"


@dataclasses.dataclass(frozen=True)
class TokenIds:
  def problem(self, v) -> Optional[str]:
    if v is None or (isinstance(v, (tuple, list)) and v and all(_is_int(i) and i >= 0 for i in v)):
      return None
    return "expected None or a non-empty tuple of token ids (ints >= 0)"


def shown(v) -> str:
  text = repr(v)
  return text if len(text) <= 80 else text[:77] + "..."


def field_problems(owner: str, fields: Iterable[str], rules: Optional[Mapping[str, Any]], values: Mapping,
                   where: str, table: str = "") -> list[str]:
  """Every problem of `values` (hyperparameters of `owner`, e.g. "method lora") one line each: a name
  not in `fields`, or a value its rule in `rules` refuses (`rules=None`: names only); REQUIRED values
  are left to the caller. A field with no rule is itself a problem (`table` names where it belongs)."""
  fields = list(fields)
  out = []
  for key, value in values.items():
    path = f"{where}.{key}" if where else key
    if key not in fields:
      out.append(f"{path}: {owner} has no hyperparameter {key!r}"
                 + (f"; valid: {', '.join(fields)}{close(key, fields)}" if fields else " (it has none)"))
    elif rules is not None and not (isinstance(value, str) and value == REQUIRED):
      out += rule_problems(path, rules.get(key), value, table)
  return out


def rule_problems(path: str, rule, value, table: str) -> list[str]:
  if rule is None:
    return [f"{path}: no rule in {table} (every field needs one; add it there)"]
  problem = rule.problem(value)
  return [f"{path}={shown(value)}: {problem}"] if problem else []
