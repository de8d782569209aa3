"""A GGUF file decoded once: its float weights and its tokenizer kept as HF folders, keyed by the file's hash.

Every `jft` command on the embedded model used to decode the GGUF file again: dequantize each tensor,
undo llama.cpp's row permutation, and build the tokenizer from the file's metadata (together 10-20 s on
2 cores, more than the peer's whole load of a converted folder). The first load writes the result as
an HF folder (float32 safetensors, config.json; the tokenizer's files in a folder beside it); later
loads read those back in well under a second. The key is the sha256 of the file's bytes, so an edited
or replaced file never reads a stale entry; a folder appears only complete (written aside, then
renamed), so a killed first load leaves nothing half written, and two processes racing to write it
both end with the same folder.

It lives in `files.cache_dir("gguf")`: `JFT_CACHE_DIR` moves it, `JFT_CACHE_DIR=off` turns it off.
"""

from __future__ import annotations

import hashlib
import os
import shutil

from jft.core import files

_CHUNK = 1 << 22
_hashes: dict[tuple, str] = {}  # (path, size, mtime) -> sha256, so one process hashes a file once


def file_hash(path: str) -> str:
  stat = os.stat(path)
  key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
  if key not in _hashes:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(_CHUNK), b""):
        digest.update(block)
    _hashes[key] = digest.hexdigest()
  return _hashes[key]


def entry(path: str, part: str) -> str | None:
  """The folder holding `part` ("weights" or "tokenizer") of the GGUF file at `path`; None with the cache off."""
  base = files.cache_dir("gguf")
  if base is None:
    return None
  return os.path.join(base, file_hash(path)[:32], part)


def is_complete(folder: str | None) -> bool:
  return folder is not None and os.path.isdir(folder)


def store(folder: str | None, write) -> None:
  """`write(tmp)` fills a temporary folder that is then renamed to `folder`. A failure to write the cache
  (a full or read-only disk) never fails the load that asked for it: the decoded model is still returned."""
  if folder is None:
    return
  tmp = f"{folder}.tmp-{os.getpid()}"
  try:
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    os.rename(tmp, folder)  # fails if another process got there first: theirs is the same content
  except OSError:
    pass
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
