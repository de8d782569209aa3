"""A run folder: what a run needs to be reproduced, resumed, evaluated and exported.

    WORKDIR/config.json        the resolved config
    WORKDIR/versions.json      python and package versions, git commit
    WORKDIR/base.json          which base model (path, content hash) the adapter belongs to
    WORKDIR/metrics.jsonl      one JSON line per log/eval event
    WORKDIR/tb/                TensorBoard events
    WORKDIR/checkpoints/N/     orbax: trainable params, optimizer state, step, rng, data position
    WORKDIR/best/N/            the best trainable params by the validation metric
    WORKDIR/summary.md         a short human summary, written at the end

The run's parts are built from this folder's config by `jft.run.assemble`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections

from jft.config import schema
from jft.config.upgrade import upgrade
from jft.core import files
from jft.run import checkpoint
from jft.core.errors import JftError
from jft.models.pretrained import resolve


class RunError(JftError, RuntimeError):
  pass


write_json = files.write_json  # the run folder's JSON files, written atomically


def read_config(workdir: str, report=None) -> ml_collections.ConfigDict:
  """The run's config, in today's layout (`jft.config.upgrade`, each change named through `report`,
  default stderr) and validated like a new one: a bad field is one error naming the file."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise RunError(f"{workdir}: not a run folder (no config.json)")
  saved = files.read_json(path, "run config")
  config, notes = upgrade(saved)
  report = report or (lambda line: print(line, file=sys.stderr))
  for note in notes:
    report(f"{path}: {note}")
  found = schema.problems(config)
  if found:
    raise RunError(f"{path}: invalid run config: " + "; ".join(found))
  return config


def versions() -> dict:
  out = {"python": sys.version.split()[0], "platform": platform.platform(),
         "devices": [str(d) for d in jax.devices()]}
  for pkg in ("jft", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "datasets", "numpy"):
    try:
      out[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      out[pkg] = None
  try:
    here = os.path.dirname(os.path.abspath(__file__))
    out["git_commit"] = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                                       text=True, timeout=10).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    out["git_commit"] = None
  return out


def base_identity(name: str) -> dict:
  """Path and SHA-256 of the base checkpoint's weight files (the adapter is only valid on it)."""
  path = resolve(name)
  files = [path] if os.path.isfile(path) else sorted(
      os.path.join(path, f) for f in os.listdir(path) if f.endswith((".safetensors", ".gguf")))
  digest = hashlib.sha256()
  for file in files:
    with open(file, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 24), b""):
        digest.update(chunk)
  return {"name": name, "path": os.path.abspath(path), "sha256": digest.hexdigest()}


def check_base(workdir: str, identity: dict):
  path = os.path.join(workdir, "base.json")
  if not os.path.isfile(path):
    return
  recorded = files.read_json(path, "base model record", {"path": str, "sha256": str})
  if recorded["sha256"] != identity["sha256"]:
    raise RunError(f"{workdir} was trained on base {recorded['path']} (sha256 {recorded['sha256'][:12]}...), "
                   f"but {identity['path']} has sha256 {identity['sha256'][:12]}...; refusing to mix them")


def best_manager(workdir: str, writer: bool = False, report=print,
                 latest: checkpoint.Checkpoints | None = None) -> checkpoint.Checkpoints:
  """`WORKDIR/best`: the best step only; a failed save of it names the run's intact step in `latest`
  (`checkpoints/`; opened here when the caller has not)."""
  latest = latest or checkpoint.manager(workdir, None, writer=writer, report=report)
  return checkpoint.Checkpoints(os.path.join(workdir, "best"), keep=1, writer=writer, report=report, fallback=latest)
