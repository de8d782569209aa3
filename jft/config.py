"""Experiment configs: `configs/NAME.py:arg` files, typed arguments, command-line overrides.

A config file defines `get_config(arg=None) -> ml_collections.ConfigDict`.
`arg` is a comma list `method=lora,mode=local` parsed with `parse_arg`
against typed defaults. Any field can then be overridden as
`--config.optim.lr=3e-4`; the string is parsed to the field's type. Every
mistake (unknown key, wrong type, missing required field, a value outside
the field's choices or range: `jft.schema`) fails here, before any model is
loaded, naming the field and the closest valid names.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import traceback
from typing import Any, Iterable

import ml_collections

from jft.errors import JftError
from jft.models.transformer import DEFAULT_REMAT
from jft.sharding import AXIS_RULES

REQUIRED = "???"  # a string field that must be set before a run


class ConfigError(JftError, ValueError):
  pass


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


def _close(key: str, names: Iterable[str]) -> str:
  close = difflib.get_close_matches(key, list(names), n=3, cutoff=0.5)
  return f" (did you mean {', '.join(close)}?)" if close else ""


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in config.items():
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      out.update(flat_keys(value, path + "."))
    else:
      out[path] = value
  return out


def load_module(path: str):
  """The config file at `path`, imported (its `get_config`, and `sweep` if it has one); a syntax error
  or an exception while importing it is a ConfigError naming `file:line`."""
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location(f"jft_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    where = f"{e.filename}:{e.lineno}" if e.filename and e.lineno else path
    raise ConfigError(f"{where}: {type(e).__name__}: {e.msg}"
                      + (f": {e.text.strip()}" if e.text and e.text.strip() else "")) from e
  except Exception as e:  # anything the file runs at import
    raise ConfigError(f"{_where(path, e)}: {_what(e)}") from e
  return module


def _where(path: str, error: BaseException) -> str:
  """`path:line` of the deepest frame of `error`'s traceback inside the config file `path`."""
  target, line = os.path.realpath(path), None
  for frame, lineno in traceback.walk_tb(error.__traceback__):
    if os.path.realpath(frame.f_code.co_filename) == target:
      line = lineno
  return f"{path}:{line}" if line else path


def _what(error: BaseException) -> str:
  """A raised ValueError or JftError is the file's own message; anything else is a bug: say which."""
  return str(error) if isinstance(error, (ValueError, JftError)) else f"{type(error).__name__}: {error}"


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
    what = _what(e) if function == "get_config" else f"{function}(): {_what(e)}"
    raise ConfigError(f"{_where(path, e)}: {what}") from e


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
  """The resolved config of a run: file + argument + overrides, validated against `jft.schema` (every
  field's choices and range) before anything is loaded. train, estimate and every sweep point come here."""
  config = load_config(spec)
  for key, value in overrides:
    override(config, key, value)
  check_required(config)
  from jft import schema  # imports the registries, which may import this module
  schema.validate(config)
  return config


def default_config() -> ml_collections.ConfigDict:
  """The fields of a run config, with defaults. Experiment files start here and edit."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = dict(name="smollm2-135m", dtype="float32", remat=DEFAULT_REMAT)
  c.method = dict(name="lora", hparams=dict(rank=8, alpha=16.0, targets=("q_proj", "v_proj")))
  c.quant = dict(format="", blocksize=64, double_quant=True)  # format "" = dense base
  # what a step minimises and evaluation reports (jft.objectives): lm, sft, classification, dpo, ...
  c.objective = dict(name="classification", hparams=dict())
  c.data = dict(path=REQUIRED, chat=True, system="", template="{text}", text_field="text",
                label_field="label", labels=("negative", "positive"), prompt_field="prompt",
                response_field="response", max_length=128, truncation="left", pack=False, bucket=1,
                train_split="train", eval_split="validation", test_split="test",
                holdout=0.1,  # one data file (no split files): the seeded fraction held out for evaluation
                max_train_examples=0, max_eval_examples=0, max_test_examples=0)
  c.train = dict(steps=100, batch_size=8, log_every=10, eval_every=0, save_every=50, keep=2,
                 nan_policy="stop", mesh=dict(data=-1, fsdp=1, tensor=1),
                 init_from="",  # an earlier run whose merged adapter is this run's base (--init-from)
                 # logical axis -> mesh axis (jft.sharding.AXIS_RULES); path overrides (regex, per-layer spec)
                 axis_rules=AXIS_RULES, sharding_overrides=())
  c.optim = dict(name="adamw", lr=1e-4, schedule="cosine", warmup_steps=10, final_lr_ratio=0.1, b1=0.9,
                 b2=0.999, momentum=0.9, weight_decay=0.0,
                 # base leaves without decay; a method names its own (jft.peft.api.Leaf.decay)
                 decay_rules=((r"(.*/)?(bias|scale)", False),),
                 clip_norm=1.0, grad_accum=1)
  c.eval = dict(batch_size=32, zero_shot=True, zero_shot_split="eval", exact_match=False, metric="accuracy")
  return c
