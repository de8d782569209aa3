"""Run checkpoints with orbax: trainable params and optimizer state (sharded arrays),
plus JSON metadata (data position, best so far).

The frozen base is never written here; a run records which base it needs
(path and content hash, in the run folder) and reloads it from there. Every
process calls `save` and `restore` with its shards (orbax coordinates them);
restore templates carry the target shardings, so a checkpoint written on one
mesh restores onto another.

A step is *complete* when orbax has finalized it (renamed its temporary
folder to `N`) and *sealed* when its file checksums (`jft_checksums.json`) are
written beside its items. `Checkpoints.restore` verifies the checksums and
skips, by name, a newest step that is incomplete or corrupt (a truncated or
flipped file) for the newest intact one. A finalized step without checksums
(saved by an older jft, or a process killed between orbax's finalization and
the checksums) is not thrown away: restoring it is its check, and a writer
seals it then. `save` deletes older steps only after the new one is sealed, so
a failed save never costs the last good checkpoint.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint._src.metadata import step_metadata_serialization

from jft.core import errors, files

CHECKSUMS = "jft_checksums.json"


class _OrbaxNoise(logging.Filter):
  """Drop orbax's ERROR lines (with their tracebacks) about what `Checkpoints` reports itself in one named
  line: `Failed to (json parse|read) Metadata file` of a damaged step, and, while a save runs, the
  background threads' errors of a save that failed (a full disk), which `save` raises as one error."""

  saving = 0  # saves in progress (orbax logs from its own threads)

  def filter(self, record: logging.LogRecord) -> bool:
    orbax = os.sep + "orbax" + os.sep in record.pathname
    if orbax and self.saving and record.levelno >= logging.ERROR:
      return False
    return not (record.pathname.endswith(os.path.join("orbax", "checkpoint", "_src", "metadata", "checkpoint.py"))
                and str(record.msg).startswith("Failed to"))


_noise = _OrbaxNoise()
logging.getLogger("absl").addFilter(_noise)


class CheckpointSaveError(errors.RunFailure, OSError):
  """A save failed (disk full, read-only folder...); the steps saved before it are intact."""


class Checkpoints:
  """A folder of step checkpoints (items `state`, `meta`) that keeps the newest `keep` complete steps."""

  def __init__(self, directory: str, keep: int | None = None, fallback: "Checkpoints | None" = None,
               writer: bool = False, report=print):
    """`writer` (the run's trainer, which holds its lock): a step whose orbax metadata would stop orbax from
    opening the folder at all is moved to `corrupt/` (through `report`); a reader gets a named error."""
    self.directory = os.path.abspath(directory)
    self.keep = keep
    self.fallback = fallback  # where the run's state is kept when this folder has none (best -> checkpoints)
    self._skipped: list[tuple[int, str]] = []  # (step, why) the last `restore` passed over
    for step, why in _unopenable_steps(self.directory):
      if not writer:
        raise errors.CorruptCheckpointError(
            f"{self.step_dir(step)}: {why}; orbax cannot open {self.directory} with it (`jft train --resume` moves "
            "the step to corrupt/)")
      report(f"checkpoint step {step} is corrupt ({why}): moved to {_move_aside(self.directory, step, why)}")
    # Retention is ours (`_prune`), so that nothing is deleted before a new step is complete.
    self._mngr = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=None,
                                                                                            create=True),
                                       item_names=("state", "meta"))

  def remove_leftovers(self) -> list[str]:
    """Delete the temporary folders of saves interrupted in an earlier process; -> their names.

    Only the run's writer calls this (it holds the workdir lock): a reader
    would delete the save a live run is writing.
    """
    found = sorted(glob.glob(os.path.join(self.directory, "*.orbax-checkpoint-tmp*")))
    if jax.process_index() == 0:
      for leftover in found:
        shutil.rmtree(leftover, ignore_errors=True)
    _sync("jft-remove-leftovers")
    self._mngr.reload()
    return [os.path.basename(f) for f in found]

  def steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: dict, meta: dict):
    """Write `step` (all processes), then its checksums, then drop steps beyond `keep`."""
    _noise.saving += 1
    try:
      self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave({**meta, "checksummed": True})),
                      force=True)
      self._mngr.wait_until_finished()
      _sync(f"jft-checkpoint-{step}")
      if jax.process_index() == 0:
        write_checksums(self.step_dir(step))
      _sync(f"jft-checksums-{step}")
    except (OSError, ValueError) as e:  # tensorstore reports a full disk as ValueError(RESOURCE_EXHAUSTED...)
      self._discard_partial(step)
      raise CheckpointSaveError(f"saving step {step} to {self.directory} failed ({_why(e)}); "
                                + self._intact_besides(step)) from e
    finally:
      _noise.saving -= 1
    self._prune(step)

  def _intact_besides(self, step: int) -> str:
    """Which complete checkpoint a failed save of `step` left intact, for its error message."""
    if kept := [s for s in self.steps() if s != step]:
      return f"the last complete checkpoint, step {kept[-1]}, is intact"
    if self.fallback is not None and (kept := self.fallback.steps()):
      return f"the run's last complete checkpoint, step {kept[-1]} in {self.fallback.directory}, is intact"
    return "no earlier checkpoint"

  def _discard_partial(self, step: int):
    """Remove what a failed save of `step` left (its temporary folder, or a step without checksums)."""
    if jax.process_index() != 0:
      return
    for leftover in glob.glob(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp*")):
      shutil.rmtree(leftover, ignore_errors=True)
    if os.path.isdir(self.step_dir(step)) and not os.path.isfile(os.path.join(self.step_dir(step), CHECKSUMS)):
      shutil.rmtree(self.step_dir(step), ignore_errors=True)
    self._mngr.reload()

  def _prune(self, newest: int):
    if not self.keep:
      return
    older = [s for s in self.steps() if s != newest]
    for s in older[:max(0, len(older) - (self.keep - 1))]:
      self._mngr.delete(s)

  def delete(self, step: int):
    self._mngr.delete(step)

  def set_aside(self, step: int, reason: str) -> str:
    """Move a broken step out of the folder (kept for inspection, never deleted); -> where it went."""
    target = _move_aside(self.directory, step, reason)
    _sync(f"jft-set-aside-{step}")
    self._mngr.reload()
    self._skipped = [(s, why) for s, why in self._skipped if s != step]
    return target

  def problem(self, step: int) -> str | None:
    """Why `step` cannot be trusted (missing/changed files, an interrupted save), or None if it is intact."""
    folder = self.step_dir(step)
    path = os.path.join(folder, CHECKSUMS)
    if not os.path.isfile(path):
      if _read_meta(folder) is None:
        return "incomplete (its metadata is missing or unreadable)"
      return None  # finalized but unsealed: `restore` reading it whole is the check (see `unsealed`)
    try:
      with open(path) as f:
        recorded = json.load(f)
    except (OSError, ValueError):
      return f"corrupt ({CHECKSUMS} unreadable)"
    if not isinstance(recorded, dict) or not all(
        isinstance(v, list) and len(v) == 2 and isinstance(v[0], int) and isinstance(v[1], str)
        for v in recorded.values()):
      return f"corrupt ({CHECKSUMS} is not a table of file sizes and digests)"
    for name, (size, digest) in sorted(recorded.items()):
      file = os.path.join(folder, name)
      if not os.path.isfile(file):
        return f"incomplete ({name} is missing)"
      if os.path.getsize(file) != size:
        return f"corrupt ({name} has {os.path.getsize(file)} bytes, {size} were saved)"
      if _digest(file) != digest:
        return f"corrupt ({name} differs from what was saved: checksum mismatch)"
    return None

  def unsealed(self, step: int) -> str | None:
    """Why a finalized `step` has no checksums (an older jft, or a save stopped just before
    them), or None when it has them."""
    if os.path.isfile(os.path.join(self.step_dir(step), CHECKSUMS)):
      return None
    meta = _read_meta(self.step_dir(step)) or {}
    return ("the save stopped after orbax finalized it, before its checksums were written"
            if meta.get("checksummed") else "saved by a jft that wrote no checksums")

  def seal(self, step: int):
    """Write the checksums of a finalized `step` that has none (process 0; all processes call)."""
    if jax.process_index() == 0 and self.unsealed(step):
      write_checksums(self.step_dir(step))
    _sync(f"jft-seal-{step}")

  def restore(self, abstract_state: dict, step: int | None = None, upgrade=None, report=print,
              seal: bool = False):
    """-> (step, state, meta) of `step`, else of the newest intact step (None if there is none).

    Without `step`, a newer step that is incomplete or corrupt is reported by
    name through `report` and skipped (see `set_aside` to move it out of the way).
    A step without checksums that restores cleanly is used, and with `seal`
    (the run's writer, which holds its lock) its checksums are written then.
    """
    candidates = [step] if step is not None else self.steps()[::-1]
    skipped = self._skipped = []
    for s in candidates:
      reason = self.problem(s)
      if reason is None:
        try:
          step_, state, meta = _restore(self._mngr, s, abstract_state, upgrade)
          out = step_, state, {k: v for k, v in meta.items() if k != "checksummed"}  # as the caller saved it
          if why := self.unsealed(s):
            if seal:
              self.seal(s)
            report(f"checkpoint: step {s} had no {CHECKSUMS} ({why}); it restored cleanly"
                   + (", checksums written now" if seal else ""))
          if skipped:
            report(f"checkpoint: using step {s} instead")
          return out
        except (errors.CheckpointMismatchError, errors.ShapeMismatchError):
          raise  # another method or model: not damage, and older steps would not match either
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
          reason = f"unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
      report(f"checkpoint: {self.step_dir(s)} is {reason}")
      skipped.append((s, reason))
    if skipped:
      raise errors.CorruptCheckpointError(
          f"{self.directory}: no intact checkpoint (" + "; ".join(f"step {s}: {r}" for s, r in skipped) + ")")
    return None

  def broken_after(self, step: int) -> list[tuple[int, str]]:
    """Steps newer than `step` and why they are not usable, as the last `restore` found them
    (it fell back to `step`); checked again only for a step that restore did not look at."""
    seen = dict(self._skipped)
    return [(s, seen.get(s) or self.problem(s) or "unreadable") for s in self.steps() if s > step]


def _why(e: BaseException) -> str:
  """A failed write's reason in a few words (tensorstore's messages run to several lines of paths)."""
  if getattr(e, "strerror", None):
    return e.strerror
  text = (str(e).splitlines() or [type(e).__name__])[0]
  if code := re.search(r"os_error_code='?(\d+)", text):  # tensorstore: "...: File too large [os_error_code='27']"
    return os.strerror(int(code.group(1)))
  if "RESOURCE_EXHAUSTED" in text:
    return os.strerror(errno.ENOSPC)
  return text[:200]


def manager(workdir: str, keep: int | None, writer: bool = False, report=print) -> Checkpoints:
  return Checkpoints(os.path.join(workdir, "checkpoints"), keep, writer=writer, report=report)


def _move_aside(directory: str, step: int, reason: str) -> str:
  """Move `directory/step` to `../corrupt/` with a WHY.txt (process 0); -> where it went."""
  target = os.path.join(os.path.dirname(directory), "corrupt",
                        f"{os.path.basename(directory)}-{step}-{time.strftime('%Y%m%d-%H%M%S')}")
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.move(os.path.join(directory, str(step)), target)
    with open(os.path.join(target, "WHY.txt"), "w") as f:
      f.write(reason + "\n")
  return target


def _unopenable_steps(directory: str) -> list[tuple[int, str]]:
  """Steps whose `_CHECKPOINT_METADATA` is JSON but not the object orbax reads: orbax's CheckpointManager
  raises on them when it opens the folder (unparseable bytes it tolerates, and checksums catch)."""
  found = []
  if not os.path.isdir(directory):
    return found
  for name in sorted(os.listdir(directory), key=lambda n: (len(n), n)):
    path = os.path.join(directory, name, "_CHECKPOINT_METADATA")
    if not name.isdigit() or not os.path.isfile(path):
      continue
    try:
      with open(path, "rb") as f:
        value = json.loads(f.read())
    except (OSError, ValueError):
      continue
    if value is None:  # orbax reads `null` as no metadata
      continue
    try:
      step_metadata_serialization.deserialize(value)
    except Exception as e:  # noqa: BLE001 -- whatever orbax raises on it, it raises when opening the folder
      found.append((int(name), f"_CHECKPOINT_METADATA is damaged ({type(e).__name__}: {str(e)[:120]})"))
  return found


def write_checksums(folder: str):
  """Record size and SHA-256 of every file of a finalized step (written atomically)."""
  recorded = {}
  for root, _, names in os.walk(folder):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), folder)
      if rel != CHECKSUMS and not rel.startswith(CHECKSUMS + ".tmp"):
        recorded[rel] = [os.path.getsize(os.path.join(root, name)), _digest(os.path.join(root, name))]
  files.write_json(os.path.join(folder, CHECKSUMS), dict(sorted(recorded.items())), indent=0)


def _digest(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _read_meta(folder: str) -> dict | None:
  try:
    with open(os.path.join(folder, "meta", "metadata")) as f:
      meta = json.load(f)
    return meta if isinstance(meta, dict) else None
  except (OSError, ValueError):
    return None


def _sync(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _restore(mngr: ocp.CheckpointManager, step: int, abstract_state: dict, upgrade=None):
  """-> (step, state, meta) of `step`; arrays placed as the template's shardings.

  A checkpoint written by an older jft (leaves since renamed, step and rng
  once stored as arrays) is read as written and matched to the template by
  path, `upgrade(old path) -> path` (the method's `upgrade_path`) renaming
  its leaves; anything that still differs is an error naming the paths.
  """
  read = lambda template: mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(template), meta=ocp.args.JsonRestore()))
  try:
    out = read(abstract_state)
    return step, out["state"], out["meta"]
  except ValueError:
    out = read(None)
  upgrade = upgrade or (lambda path: path)
  saved = {upgrade(_path(p)): v for p, v in jax.tree_util.tree_flatten_with_path(out["state"])[0]}
  saved = {p: v for p, v in saved.items() if p not in ("step", "rng")}  # moved to the JSON metadata
  wanted, treedef = jax.tree_util.tree_flatten_with_path(abstract_state)
  paths = [_path(p) for p, _ in wanted]
  missing, extra = sorted(set(paths) - set(saved)), sorted(set(saved) - set(paths))
  if missing or extra:
    raise errors.CheckpointMismatchError(
        f"{mngr.directory}/{step}: does not match this run (missing {missing[:4]}, unexpected {extra[:4]})")
  leaves = []
  for path, (_, like) in zip(paths, wanted):
    if tuple(saved[path].shape) != tuple(like.shape):
      raise errors.ShapeMismatchError(f"{mngr.directory}/{step}: {path} has shape {tuple(saved[path].shape)}, "
                                      f"expected {tuple(like.shape)}")
    leaves.append(jax.device_put(jnp.asarray(saved[path], like.dtype), like.sharding))
  return step, jax.tree_util.tree_unflatten(treedef, leaves), out["meta"]


def _path(keys) -> str:
  """A tree path as `a/0/mu/b` whatever the containers (dicts, tuples, named tuples)."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in keys)


def abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                      tree)
