"""One writer per run folder: `WORKDIR/.lock` names the training process that owns the folder.

The lock file is created with O_CREAT|O_EXCL, so of two runs started on one folder exactly one
gets it; it holds the owner's PID, host and process start time, and is removed when the run ends,
fails or is stopped (SIGINT, SIGTERM). A lock whose process is gone (same host; PID dead, a zombie,
or reused by another process) is stale and taken over with a message. A lock from another host is
never guessed about: the error names it and the user removes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading

from jft.core.errors import JftError

NAME = ".lock"
_held: set[str] = set()  # lock paths this process holds (a PID reused after a restart may be our own)


class WorkdirLockedError(JftError, RuntimeError):
  """Another live process is training in the same run folder."""


@contextlib.contextmanager
def workdir_lock(workdir: str, enabled: bool = True, warn=None):
  """Hold `workdir`'s lock for the block. `enabled=False` (processes other than 0) does nothing."""
  if not enabled:
    yield
    return
  warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(os.path.realpath(workdir), NAME)
  mine = _acquire(path, warn)
  _held.add(path)
  try:
    with _sigterm_exits():
      yield
  finally:
    _held.discard(path)
    _release(path, mine)


def _record() -> bytes:
  return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid())}).encode()


def _acquire(path: str, warn) -> bytes:
  """Create the lock file, taking over a stale one; -> the bytes written (to recognise it on release)."""
  mine = _record()
  for _ in range(3):  # another process may take a stale lock over at the same moment: look again
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      pass
    else:
      with os.fdopen(fd, "wb") as f:
        f.write(mine)
      return mine
    seen = _read(path)
    if seen is None:  # removed meanwhile
      continue
    owner = _parse(seen)
    if owner is None:
      raise WorkdirLockedError(f"{path}: unreadable lock file ({seen[:60]!r}); if no run is using "
                               f"{os.path.dirname(path)}, remove it")
    if _alive(owner, path):
      raise WorkdirLockedError(f"{os.path.dirname(path)} is in use by process {owner['pid']} on {owner['host']} "
                               f"(lock {path}); wait for it to finish, or use another --workdir")
    # Stale: move it aside (atomic) and check that what moved is the stale lock, not a fresh one.
    aside = f"{path}.stale-{os.getpid()}"
    try:
      os.rename(path, aside)
    except FileNotFoundError:
      continue
    moved = _read(aside)
    if moved != seen:  # a fresh lock, taken by a process that won the takeover: give it back
      with contextlib.suppress(FileExistsError):
        os.link(aside, path)
      os.remove(aside)
      continue
    os.remove(aside)
    warn(f"taking over the stale lock {path} of process {owner['pid']} on {owner['host']} (no longer running)")
  raise WorkdirLockedError(f"{path}: could not take the lock (other processes keep taking it)")


def _release(path: str, mine: bytes):
  if _read(path) == mine:  # never remove a lock another process took over
    os.remove(path)


def _read(path: str) -> bytes | None:
  try:
    with open(path, "rb") as f:
      return f.read()
  except FileNotFoundError:
    return None


def _parse(raw: bytes) -> dict | None:
  try:
    owner = json.loads(raw)
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) and owner.get("host") else None
  except ValueError:
    return None


def owner(workdir: str) -> dict | None:
  """The live process holding `workdir`'s lock ({"pid", "host", ...}), or None (no lock, or a stale one)."""
  path = os.path.join(os.path.realpath(workdir), NAME)
  seen = _read(path)
  found = _parse(seen) if seen is not None else None
  return found if found is not None and _alive(found, path) else None


def pid_running(pid: int) -> bool:
  """Whether process `pid` on this host may still be running (e.g. the writer of a `.tmp-PID` folder)."""
  return _alive({"pid": pid, "host": socket.gethostname()}, "")


def _alive(owner: dict, path: str) -> bool:
  """Whether the lock's owner may still be running (a lock from another host always may)."""
  if owner["host"] != socket.gethostname():
    return True
  pid = owner["pid"]
  if pid == os.getpid():  # ours only while this process holds it; else a restart reused our PID
    return path in _held
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    pass
  fields = _proc_stat(pid)
  if fields is None:  # no /proc (not Linux), or it just ended: the PID answered, so assume it runs
    return True
  return fields[0] != "Z" and owner.get("started") in (None, int(fields[19]))


@contextlib.contextmanager
def _sigterm_exits():
  """SIGTERM raises SystemExit (so `finally` blocks run and the lock goes) where it would kill outright.

  A handler someone installed is kept; signals reach only the main thread's handlers.
  """
  if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
    yield
    return

  def exit_(signum, _frame):
    raise SystemExit(128 + signum)

  signal.signal(signal.SIGTERM, exit_)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _proc_stat(pid: int) -> list[str] | None:
  """/proc/PID/stat after the command name (Linux): [state, ppid, ...], or None."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
  except (OSError, IndexError):
    return None
  return fields if len(fields) > 19 else None


def _start_time(pid: int) -> int | None:
  """The process's start time in clock ticks since boot: a PID reused by a later process differs."""
  fields = _proc_stat(pid)
  return int(fields[19]) if fields else None
