"""Run folders written by an earlier jft: their saved config in today's layout, with a note per change.

Runs outlive the code that wrote them; `jft.run.folder.read_config` reads every
run's config.json through `upgrade`, and the compatibility tests keep old run
folders loading.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import ml_collections

from jft.config import schema
from jft.core.fields import shown


def upgrade(saved: Mapping) -> tuple[Any, list[str]]:
  """A run's saved `config.json` (a dict) -> (the config in today's layout, notes on what changed).

  Runs outlive the code that wrote them: `eval`, `export` and `--resume` read
  configs written before a field existed or moved. Fields that moved are
  moved (`data.task` -> `objective.name`), fields added since take their
  default, and fields this jft no longer reads are dropped; each is one note.
  The result is then checked with `schema.problems` like any config.
  """
  saved = copy.deepcopy(dict(saved))
  notes = []
  if "objective" not in saved and isinstance(saved.get("data"), dict) and "task" in saved["data"]:
    task = saved["data"].pop("task")
    saved["objective"] = {"name": task, "hparams": {}}
    notes.append(f"data.task={task!r} read as objective.name (the layout before objectives)")
  merged = schema.default_config().to_dict()
  for hp in schema.HPARAMS:  # saved hyperparameters replace the defaults whole (another method has other names)
    section, _ = hp.split(".")
    if isinstance(saved.get(section), dict) and isinstance(saved[section].get("hparams"), dict):
      merged[section]["hparams"] = saved[section].pop("hparams")
  kept = schema.flat_keys(ml_collections.ConfigDict(saved))
  for path, value in kept.items():
    if path not in schema.SCHEMA:
      notes.append(f"{path}={shown(value)} ignored (not a field of this jft)")
      continue
    node = merged
    *parents, leaf = path.split(".")
    for key in parents:
      node = node[key]
    node[leaf] = value
  defaults = schema.flat_keys(schema.default_config())
  notes += [f"{path} missing; using the default {shown(defaults[path])}" for path in schema.SCHEMA if path not in kept]
  return ml_collections.ConfigDict(merged), notes
