"""Experiment configs: `configs/NAME.py:arg` files, typed arguments, command-line overrides.

A config file defines `get_config(arg=None) -> ml_collections.ConfigDict`.
`arg` is a comma list `method=lora,mode=local` parsed with `parse_arg`
against typed defaults. Any field can then be overridden as
`--config.optim.lr=3e-4`; the string is parsed to the field's type. Every
mistake (unknown key, wrong type, missing required field, a value outside
the field's choices or range: `jft.config.schema`) fails here, before any model is
loaded, naming the field and the closest valid names.

Layer 5 (imports objectives/ and below). `schema.py` holds the default config,
the rules of every section's fields, and collects the rules each method and
objective declares beside its own fields. `upgrade.py` reads the config of a
run folder written by an earlier jft in today's layout.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import traceback
from typing import Any

import ml_collections

from jft.config import schema
from jft.core import files
from jft.core.errors import JftError
# What a config is (its fields, defaults and rules) lives in `jft.config.schema`; config files import these from here.
from jft.config.schema import REQUIRED, ConfigError, _close, default_config, flat_keys  # noqa: F401

def _typed(text: str, like: Any, where: str):
  """Parse `text` to the type of `like` (the default)."""
  if isinstance(like, bool):
    low = text.lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ConfigError(f"{where}: expected a bool (true/false), got {text!r}")
  if isinstance(like, int) and not isinstance(like, bool):
    try:
      return int(text)
    except ValueError:
      raise ConfigError(f"{where}: expected an int, got {text!r}") from None
  if isinstance(like, float):
    try:
      return float(text)
    except ValueError:
      raise ConfigError(f"{where}: expected a float, got {text!r}") from None
  if isinstance(like, str):
    return text
  if isinstance(like, (tuple, list)):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = tuple(t.strip() for t in text.split(",") if t.strip())
    if isinstance(value, (str, int, float)):
      value = (value,)
    return tuple(value)
  # None (optional) or anything else: a Python literal if it is one, else the string.
  if text.lower() == "none":
    return None
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """`"method=lora,mode=local"` -> ConfigDict typed by `defaults` (unknown names are errors)."""
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    if not item.strip():
      continue
    if "=" not in item:
      raise ConfigError(f"config argument {item!r}: expected name=value")
    key, value = (s.strip() for s in item.split("=", 1))
    if key not in defaults:
      raise ConfigError(f"config argument {key!r} is unknown; valid: {', '.join(defaults)}{_close(key, defaults)}")
    out[key] = _typed(value, defaults[key], f"config argument {key}")
  return out


def load_module(path: str):
  """The config file at `path`, imported (its `get_config`, and `sweep` if it has one); a syntax error
  or an exception while importing it is a ConfigError naming `file:line`."""
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist")
  return files.import_file(path, ConfigError)


def call(spec: str, function: str = "get_config"):
  """`path/to/file.py[:arg]` -> the file's `function(arg)` (`get_config`, `sweep`); a missing
  function, an argument it rejects or an error it raises is a ConfigError naming `file:line`."""
  path, _, arg = spec.partition(":")
  module = load_module(path)
  if not hasattr(module, function):
    raise ConfigError(f"{path}: defines no {function}(arg=None)")
  try:
    return getattr(module, function)(arg or None)
  except Exception as e:
    what = files.what_of(e) if function == "get_config" else f"{function}(): {files.what_of(e)}"
    raise ConfigError(f"{files.where_in(path, e)}: {what}") from e


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`path/to/file.py[:arg]` -> the file's `get_config(arg)`, locked."""
  config = call(spec)
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{spec.partition(':')[0]}: get_config returned a {type(config).__name__}, not a ConfigDict")
  config.lock()  # from here on, a misspelt key is an error, not a new field
  return config


def override(config: ml_collections.ConfigDict, key: str, text: str):
  """Set `a.b.c` from a command-line string, typed by the current value."""
  keys = flat_keys(config)
  if key not in keys:
    raise ConfigError(f"unknown config field {key!r}{_close(key, keys)}")
  node = config
  *parents, leaf = key.split(".")
  for part in parents:
    node = node[part]
  value = _typed(text, keys[key], f"--config.{key}")
  with config.unlocked():
    try:
      node[leaf] = value
    except TypeError as e:
      raise ConfigError(f"--config.{key}={text!r}: {e}") from None


def parse_overrides(argv: list[str]) -> list[tuple[str, str]]:
  """`--config.a.b=1` and `--config.a.b 1` -> [("a.b", "1")]; anything else is an error."""
  out, i = [], 0
  while i < len(argv):
    arg = argv[i]
    if not arg.startswith("--config."):
      raise ConfigError(f"unrecognised argument {arg!r} (overrides look like --config.optim.lr=3e-4)")
    body = arg[len("--config."):]
    if "=" in body:
      key, value = body.split("=", 1)
    elif i + 1 < len(argv):
      key, value = body, argv[i + 1]
      i += 1
    else:
      raise ConfigError(f"{arg}: missing a value")
    out.append((key, value))
    i += 1
  return out


def check_required(config: ml_collections.ConfigDict):
  missing = [k for k, v in flat_keys(config).items() if v == REQUIRED]
  if missing:
    raise ConfigError(f"required config field(s) not set: {', '.join(missing)} "
                      f"(set them with --config.{missing[0]}=...)")


def build(spec: str, overrides: list[tuple[str, str]] = ()) -> ml_collections.ConfigDict:
  """The resolved config of a run: file + argument + overrides, validated against `jft.config.schema` (every
  field's choices and range) before anything is loaded. train, estimate and every sweep point come here."""
  config = load_config(spec)
  for key, value in overrides:
    override(config, key, value)
  check_required(config)
  schema.validate(config)
  return config
