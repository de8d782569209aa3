"""Writing outputs safely: one guard for where a command may write, and atomic writes.

Every command that writes something a user names (`export`, `ablate`, `pairs`,
`report`, `sweep`) asks `check_output` first, so the rules live here once:

- never over or into a run folder's own files (its checkpoints, config,
  metrics...) or its base model, nor over a folder that holds a run;
- an existing file, or a non-empty folder, is replaced only with `--overwrite`;

and writes through `write_file` / `write_folder`: the content goes to a
temporary sibling (`NAME.tmp-PID`) that is renamed in once complete, so an
interrupted or failed write leaves the old output as it was and no temporary
behind.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import sys
import traceback

from jft.core.errors import JftError
from jft.core.lock import pid_running

# What jft writes into a run folder and reads back: nothing else may write over or into these.
RUN_ENTRIES = ("config.json", "versions.json", "base.json", "metrics.jsonl", "results.json", "samples.json",
               "summary.md", "shardings.json", "checkpoints", "best", "corrupt", "tb", ".lock")


class OutputPathError(JftError):
  """An output path a command refuses to write (a run's own files, its base model, an existing output)."""


def is_run_folder(path: str) -> bool:
  """A folder `jft train` wrote: its config beside checkpoints or metrics."""
  return (os.path.isfile(os.path.join(path, "config.json"))
          and any(os.path.exists(os.path.join(path, n)) for n in ("checkpoints", "metrics.jsonl", "base.json")))


def _inside(path: str, folder: str) -> bool:
  return path == folder or path.startswith(folder + os.sep)


def _run_entry_at(path: str) -> str | None:
  """The run-folder entry (`RUN/checkpoints`, `RUN/metrics.jsonl`) that `path` is or lies inside, if any."""
  head = path
  while True:
    parent, name = os.path.split(head)
    if not name:
      return None
    if name in RUN_ENTRIES and is_run_folder(parent):
      return head
    head = parent


def base_model_of(run_folder: str) -> str | None:
  """The base model folder a run records (`base.json`), or None."""
  path = os.path.join(run_folder, "base.json")
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      return os.path.realpath(json.load(f)["path"])
  except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
    raise OutputPathError(f"{path}: unreadable ({type(e).__name__}: {e}); cannot tell where the run's base model "
                          "is, so nothing is written") from e


def check_output(out: str, *, overwrite: bool, flag: str = "--out", protected: tuple[str, ...] = (),
                 folder: bool = True) -> str:
  """The real path of `out` if a command may write it; else an `OutputPathError` saying why.

  `protected`: run folders (and with them their base models) that must not be
  written over or into at all, even where `out` would be a new entry of theirs.
  """
  real = os.path.realpath(out)
  guarded = []
  for p in protected:
    guarded.append(os.path.realpath(p))
    if base := base_model_of(p):
      guarded.append(base)
  for path in guarded:
    if _inside(real, path) or _inside(path, real):
      raise OutputPathError(f"{flag} {out}: refusing to write over or into {path} (a run folder or its base model)")
  if entry := _run_entry_at(real):
    raise OutputPathError(f"{flag} {out}: refusing to write over or into {entry}, a file of the run folder "
                          f"{os.path.dirname(entry)}")
  if is_run_folder(real):
    raise OutputPathError(f"{flag} {out}: refusing to write over the run folder {real}")
  if os.path.isdir(real) and (runs := [n for n in sorted(os.listdir(real)) if is_run_folder(os.path.join(real, n))]):
    raise OutputPathError(f"{flag} {out}: refusing to write over {real}: it holds the run folder {runs[0]}")
  if os.path.exists(real):
    if folder and not os.path.isdir(real):
      raise OutputPathError(f"{flag} {out} exists and is not a folder")
    if not folder and os.path.isdir(real):
      raise OutputPathError(f"{flag} {out} is a folder; name a file")
    if not overwrite and (not folder or os.listdir(real)):
      raise OutputPathError(f"{flag} {out} exists{' and is not empty' if folder else ''}; pass --overwrite to "
                            "replace it, or choose another path")
  return real


CACHE_ENV = "JFT_CACHE_DIR"


def cache_dir(kind: str) -> str | None:
  """jft's cache folder for `kind` (decoded GGUF files, compiled XLA programs): `$JFT_CACHE_DIR/kind`, by
  default under `~/.cache/jft`; None when `JFT_CACHE_DIR=off`. Only ever a cache: deleting it costs time."""
  value = os.environ.get(CACHE_ENV, "")
  if value.lower() == "off":
    return None
  return os.path.join(value or os.path.join(os.path.expanduser("~"), ".cache", "jft"), kind)


def _temporary(path: str) -> str:
  return f"{path}.tmp-{os.getpid()}"


@contextlib.contextmanager
def write_file(path: str, mode: str = "w", encoding: str | None = "utf-8", newline: str | None = None):
  """`with write_file(path) as f:` writes `path.tmp-PID`, renamed to `path` only when the block ends cleanly."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = _temporary(path)
  try:
    with open(tmp, mode, encoding=None if "b" in mode else encoding, newline=newline) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_json(path: str, obj, indent: int | None = 2):
  with write_file(path) as f:
    json.dump(obj, f, indent=indent, default=str)


def write_folder(out: str, write):
  """`write(folder)` into `<out>.tmp-PID`, then swap it in for `out`: a failed or interrupted write leaves
  `out` as it was, and an old `out` is removed only once the new one is complete."""
  tmp, old = _temporary(out), f"{out}.old-{os.getpid()}"
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  remove_stale(out)
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    write(tmp)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.isdir(out):  # empty, or --overwrite: moved aside, not deleted, until the new one is in place
    os.rename(out, old)
  try:
    os.rename(tmp, out)
  except BaseException:
    if os.path.isdir(old):
      os.rename(old, out)
    raise
  shutil.rmtree(old, ignore_errors=True)


def remove_stale(out: str):
  """Remove what a killed write (SIGKILL, power loss) of `out` left beside it: `<out>.tmp-PID` of a
  process that is gone. Its `<out>.old-PID` (the previous output, moved aside) goes only if `out` exists;
  without `out` it is the only copy, so it is kept and named."""
  parent, name = os.path.split(out)
  for entry in sorted(os.listdir(parent or ".")):
    m = re.fullmatch(re.escape(name) + r"\.(tmp|old)-(\d+)", entry)
    if not m or pid_running(int(m.group(2))):
      continue
    path = os.path.join(parent, entry)
    if m.group(1) == "tmp" or os.path.isdir(out):
      print(f"removing {path}: left by an interrupted write (process {m.group(2)} is gone)", file=sys.stderr)
      shutil.rmtree(path, ignore_errors=True)
    else:
      print(f"keeping {path}: the folder an interrupted write was replacing (move it back to {out} "
            "to keep it)", file=sys.stderr)


# ----------------------------------------------------------------------------
# Reading back what jft wrote: one validated loader per kind of file
# ----------------------------------------------------------------------------

class RunFileError(JftError, ValueError):
  """A file jft wrote (a run's config.json, a sweep's point.json...) that cannot be read as what it is."""


def _type_name(types) -> str:
  types = types if isinstance(types, tuple) else (types,)
  names = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object",
           bool: "true or false", type(None): "null"}
  return " or ".join(names.get(t, t.__name__) for t in types)


def _has_type(value, types) -> bool:
  types = types if isinstance(types, tuple) else (types,)
  if isinstance(value, bool) and bool not in types:
    return False
  return isinstance(value, types) or (float in types and isinstance(value, int) and not isinstance(value, bool))


def problem_of(record, fields: dict) -> str | None:
  """Why `record` is not an object with `fields` ({name: type or tuple of types}), or None."""
  if not isinstance(record, dict):
    return f"a JSON {type(record).__name__}, expected an object"
  for name, types in fields.items():
    if name not in record:
      return f"no field {name!r}"
    if not _has_type(record[name], types):
      return f"field {name!r} is {record[name]!r}, expected {_type_name(types)}"
  return None


def read_json(path: str, what: str, fields: dict | None = None) -> dict:
  """The JSON object in `path` (a `what`: "run config", "sweep point"...), with `fields` checked; anything
  else (unreadable bytes, not JSON, a missing or mistyped field) is a `RunFileError` naming file and field."""
  try:
    with open(path, "rb") as f:
      text = f.read().decode("utf-8")
    record = json.loads(text)
  except UnicodeDecodeError as e:
    raise RunFileError(f"{path}: not a {what} (not UTF-8 text: byte {e.start})") from None
  except json.JSONDecodeError as e:
    raise RunFileError(f"{path}: not valid JSON ({e.msg}: line {e.lineno} column {e.colno}); not a {what}") from None
  except OSError as e:
    raise RunFileError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
  if why := problem_of(record, fields or {}):
    raise RunFileError(f"{path}: not a {what} ({why})")
  return record


METRIC_FIELDS = {"step": int, "kind": str}


def parse_record(raw: bytes, fields: dict = METRIC_FIELDS) -> dict | None:
  """One line of a JSONL file jft wrote, or None when it is damaged (cut short, not UTF-8, not a JSON
  object, a field missing or mistyped)."""
  try:
    record = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError):
    return None
  return None if problem_of(record, fields) else record


def read_records(path: str, fields: dict = METRIC_FIELDS, warn=None) -> list[dict]:
  """The whole records of a JSONL file jft wrote (`metrics.jsonl`); damaged lines are left out with one
  warning naming them (a line cut short by a kill or a full disk is expected, never a reason to stop)."""
  if not os.path.isfile(path):
    return []
  records, damaged = [], []
  with open(path, "rb") as f:
    for number, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      record = parse_record(raw, fields)
      if record is None:
        damaged.append(number)
      else:
        records.append(record)
  if damaged:
    (warn or _stderr)(f"warning: {path}: left out {len(damaged)} damaged line(s) ({_lines(damaged)})")
  return records


def _lines(numbers: list[int]) -> str:
  shown = ", ".join(map(str, numbers[:8]))
  return f"line {shown}" + (f" and {len(numbers) - 8} more" if len(numbers) > 8 else "")


def _stderr(line: str):
  print(line, file=sys.stderr, flush=True)


def pyplot():
  """matplotlib's pyplot writing files only (no display needed)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def save_figure(fig, path: str):
  """A matplotlib figure as PNG, written like every other run file (atomically)."""
  with write_file(path, "wb") as f:
    fig.savefig(f, format="png", dpi=110)


def import_file(path: str, error=JftError):
  """The Python file at `path`, imported as a module (a config file, a reward function's file); a syntax
  error or an exception while importing it is `error` naming `file:line`."""
  spec = importlib.util.spec_from_file_location(f"jft_file_{abs(hash(os.path.abspath(path)))}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    where = f"{e.filename}:{e.lineno}" if e.filename and e.lineno else path
    raise error(f"{where}: {type(e).__name__}: {e.msg}"
                + (f": {e.text.strip()}" if e.text and e.text.strip() else "")) from e
  except Exception as e:  # anything the file runs at import
    raise error(f"{where_in(path, e)}: {what_of(e)}") from e
  return module


def where_in(path: str, error: BaseException) -> str:
  """`path:line` of the deepest frame of `error`'s traceback inside the file `path`."""
  target, line = os.path.realpath(path), None
  for frame, lineno in traceback.walk_tb(error.__traceback__):
    if os.path.realpath(frame.f_code.co_filename) == target:
      line = lineno
  return f"{path}:{line}" if line else path


def what_of(error: BaseException) -> str:
  """A raised ValueError or JftError is the file's own message; anything else is a bug: say which."""
  return str(error) if isinstance(error, (ValueError, JftError)) else f"{type(error).__name__}: {error}"
