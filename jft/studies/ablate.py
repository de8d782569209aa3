"""Checkpoint-restore ablations: which layers, modules, ranks and virtual tokens a trained run relies on.

The run is restored once and many param trees are evaluated on the same
examples in one process. "Removing" the method somewhere puts back the value
its `init` gave there, on the run's base with the run's seed: `jft.run.restore`
builds that state exactly as training did, so for every method whose
`init_is_base` the removed part computes the base model (LoRA's b = 0, IA3's
ones, BitFit's and full fine-tuning's own base values, DoRA's column norms,
PiSSA's principal factors beside its residual). Ablated trees keep the
trained tree's shapes and shardings, so the evaluation compiles once; only
token ablations change a shape (one compile per number of virtual tokens).

    layers    the method's leaves under `layers/` removed from layer i, for every i, and from all layers
    modules   removed from one module type at a time (q_proj, ..., or the parents of full FT's leaves)
    rank      LoRA's update a @ b replaced by its best rank-k approximation (SVD), zero-padded to rank r
    tokens    prompt/prefix tuning keeps its first k virtual tokens (the model reads k off the leaf shape)
"""

from __future__ import annotations

import csv
import os
import sys
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from jft import objectives, peft, run
from jft.core import files, rules
from jft.peft.lora import LoRA
from jft.run.train import evaluate_split, examples_for
from jft.core.errors import JftError

KINDS = ("layers", "modules", "rank", "tokens")
MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class AblateError(JftError, ValueError):
  """An ablation that cannot be run (does not apply to the method, no checkpoint, bad --out)."""


# ----------------------------------------------------------------------------
# Which ablations apply
# ----------------------------------------------------------------------------

def parts(method) -> list:
  """The methods a (possibly composed) method is made of."""
  if isinstance(method, peft.Compose):
    return [q for m in method.methods for q in parts(m)]
  return [method]


def method_label(method) -> str:
  return "+".join(m.name for m in parts(method))


def why_not(method, kind: str) -> Optional[str]:
  """None when `kind` applies to `method`, else the reason (from the method alone, before any restore)."""
  ms = parts(method)
  if kind in ("layers", "modules"):
    adds = [m.name for m in ms if not m.init_is_base]
    return "its init adds virtual tokens; try --kind tokens" if adds else None
  if kind == "rank":
    return None if any(isinstance(m, LoRA) for m in ms) else "no low-rank factors"
  if kind == "tokens":
    return None if any(not m.init_is_base for m in ms) else "no virtual tokens"
  raise AblateError(f"unknown ablation kind {kind!r}; expected one of {', '.join(KINDS)} or all")


def not_applicable(method, kind: str, reason: str) -> str:
  return f"{kind} does not apply to {method_label(method)} ({reason})"


# ----------------------------------------------------------------------------
# Ablated trees (trainable trees shaped like the trained one)
# ----------------------------------------------------------------------------

def module_of(method, path: str) -> str:
  """The module type a trainable leaf belongs to: the module holding the method's group, else the leaf's parent."""
  owned = method.own(path)
  module = owned[0] if owned is not None else path.rsplit("/", 1)[0] if "/" in path else ""
  return module.rsplit("/", 1)[-1] or "(top level)"


def layer_paths(trained: dict) -> list[str]:
  """Trainable leaves with the stacked layer axis (under `layers/`): what layer ablations change."""
  return [p for p in rules.flatten(trained) if p.startswith("layers/")]


def num_layers(trained: dict) -> int:
  flat = rules.flatten(trained)
  sizes = {flat[p].shape[0] for p in layer_paths(trained)}
  if len(sizes) != 1:
    raise AblateError(f"trainable leaves under layers/ disagree on the number of layers: {sorted(sizes)}")
  return sizes.pop()


def without_layer(trained: dict, initial: dict, layer: Optional[int]) -> dict:
  """`trained` with every leaf under `layers/` back at its initial value at `layer` (None: at every layer)."""
  flat, init = rules.flatten(trained), rules.flatten(initial)
  for p in layer_paths(trained):
    flat[p] = init[p] if layer is None else flat[p].at[layer].set(init[p][layer])
  return rules.unflatten(flat)


def modules(method, trained: dict) -> list[str]:
  """Module types holding trainable leaves, in the usual order (attention, then MLP, then the rest)."""
  found = list(dict.fromkeys(module_of(method, p) for p in rules.flatten(trained)))
  rank = {m: i for i, m in enumerate(MODULE_ORDER)}
  return sorted(found, key=lambda m: (rank.get(m, len(rank)), found.index(m)))


def without_module(method, trained: dict, initial: dict, module: str) -> dict:
  """`trained` with every leaf of module type `module` back at its initial value (in every layer)."""
  flat, init = rules.flatten(trained), rules.flatten(initial)
  for p in flat:
    if module_of(method, p) == module:
      flat[p] = init[p]
  return rules.unflatten(flat)


def lora_pairs(trained: dict) -> list[str]:
  """Modules with LoRA factors `lora/a` [..., in, r] and `lora/b` [..., r, out]."""
  flat = rules.flatten(trained)
  return [p[: -len("/lora/a")] for p in flat if p.endswith("/lora/a") and p[: -1] + "b" in flat]


def trained_rank(trained: dict) -> int:
  ranks = {rules.flatten(trained)[m + "/lora/a"].shape[-1] for m in lora_pairs(trained)}
  if len(ranks) != 1:
    raise AblateError(f"LoRA factors of different ranks {sorted(ranks)}; rank ablation needs one rank")
  return ranks.pop()


def truncate(a, b, k: int):
  """(a', b') of a's and b's shapes with a' @ b' the best rank-k approximation of a @ b (per leading index).

  Computed in float64 (numpy SVD); columns of a' and rows of b' past k are zero.
  """
  a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
  u, s, vh = np.linalg.svd(a64 @ b64, full_matrices=False)  # batched over the leading (layer) axes
  k = min(k, a64.shape[-1])
  root = np.sqrt(s[..., :k])
  a_k, b_k = np.zeros_like(a64), np.zeros_like(b64)
  a_k[..., :, :k] = u[..., :, :k] * root[..., None, :]
  b_k[..., :k, :] = root[..., :, None] * vh[..., :k, :]
  return a_k.astype(np.asarray(a).dtype), b_k.astype(np.asarray(b).dtype)


def with_rank(trained: dict, k: int) -> dict:
  """`trained` with every LoRA update a @ b replaced by its best rank-k approximation (shapes kept)."""
  flat = rules.flatten(trained)
  for m in lora_pairs(trained):
    flat[m + "/lora/a"], flat[m + "/lora/b"] = truncate(flat[m + "/lora/a"], flat[m + "/lora/b"], k)
  return rules.unflatten(flat)


def virtual_axes(params: dict) -> dict[str, int]:
  """{path: axis} of the virtual-token leaves of a materialized tree (a method leaf whose axes name "virtual")."""
  out = {}
  for path, leaf in rules.flatten(params).items():
    parts_ = path.split("/")
    for cls in peft.METHODS.values():
      if cls.group and cls.group in parts_[:-1]:
        spec = cls.leaves.get(parts_[parts_.index(cls.group) + 1])
        if spec is not None and spec.axes and "virtual" in spec.axes:
          out[path] = spec.axes.index("virtual") - len(spec.axes)  # counted from the end
  return out


def num_tokens(params: dict) -> int:
  flat, axes = rules.flatten(params), virtual_axes(params)
  sizes = {flat[p].shape[a] for p, a in axes.items()}
  if len(sizes) != 1:
    raise AblateError(f"virtual-token leaves {sorted(axes)} disagree on their number: {sorted(sizes)}")
  return sizes.pop()


def first_tokens(params: dict, k: int) -> dict:
  """A materialized tree keeping the first k virtual tokens of every virtual-token leaf."""
  flat = rules.flatten(params)
  for path, axis in virtual_axes(params).items():
    flat[path] = jax.lax.slice_in_dim(flat[path], 0, k, axis=axis)
  return rules.unflatten(flat)


def powers_of_two(n: int) -> list[int]:
  """1, 2, 4, ... below n, and n."""
  return [2 ** i for i in range(max(n - 1, 0).bit_length()) if 2 ** i < n] + [n]


def describe_leaves(method, paths: Sequence[str]) -> str:
  """Compact names of leaf paths: 'lora/a, lora/b of q_proj, v_proj; scale of input_layernorm'."""
  by_leaf: dict[str, list[str]] = {}
  for p in paths:
    owned = method.own(p)
    module = module_of(method, p)
    leaf = p[len(owned[0]) + 1:] if owned is not None and owned[0] else p.rsplit("/", 1)[-1]
    by_leaf.setdefault(leaf, [])
    if module not in by_leaf[leaf]:
      by_leaf[leaf].append(module)
  by_modules: dict[tuple, list[str]] = {}
  for leaf, mods in by_leaf.items():
    by_modules.setdefault(tuple(mods), []).append(leaf)
  return "; ".join(f"{', '.join(leaves)} of {', '.join(mods)}" for mods, leaves in by_modules.items())


# ----------------------------------------------------------------------------
# The plan: (kind, label, leaves, make) for every ablation of a restored run
# ----------------------------------------------------------------------------

def plan(kind: str, r) -> list[tuple]:
  """[(kind, ablation label, leaves it changes, make() -> ("trainable" | "params", tree))] for `r` (run.Restored).

  Raises AblateError when the kind does not apply to what the run trained.
  """
  method, trained, initial = r.method, r.trainable, r.init.trainable
  reason = why_not(method, kind)
  if reason:
    raise AblateError(not_applicable(method, kind, reason))
  out = []
  if kind == "layers":
    paths = layer_paths(trained)
    if not paths:
      raise AblateError(not_applicable(method, kind, "no trainable leaves under layers/"))
    leaves = describe_leaves(method, paths)
    for i in range(num_layers(trained)):
      out.append((kind, f"layer {i}", leaves, lambda i=i: ("trainable", without_layer(trained, initial, i))))
    out.append((kind, "all layers", leaves, lambda: ("trainable", without_layer(trained, initial, None))))
  elif kind == "modules":
    for m in modules(method, trained):
      paths = [p for p in rules.flatten(trained) if module_of(method, p) == m]
      out.append((kind, f"module {m}", describe_leaves(method, paths),
                  lambda m=m: ("trainable", without_module(method, trained, initial, m))))
  elif kind == "rank":
    if not lora_pairs(trained):
      raise AblateError(not_applicable(method, kind, "no trainable lora/a, lora/b leaves"))
    leaves = describe_leaves(method, [f"{m}/lora/{x}" for m in lora_pairs(trained) for x in "ab"])
    for k in powers_of_two(trained_rank(trained)):
      out.append((kind, f"rank {k}", leaves, lambda k=k: ("trainable", with_rank(trained, k))))
  elif kind == "tokens":
    params = r.params()
    axes = virtual_axes(params)
    if not axes:
      raise AblateError(not_applicable(method, kind, "no virtual-token leaves in the materialized tree"))
    leaves = ", ".join(sorted(axes))
    for k in powers_of_two(num_tokens(params)):
      out.append((kind, f"tokens {k}", leaves, lambda k=k: ("params", first_tokens(r.params(), k))))
  return out


# ----------------------------------------------------------------------------
# The entry: restore once, evaluate every ablation, write OUT whole
# ----------------------------------------------------------------------------

def has_checkpoint(workdir: str, which: str) -> bool:
  folders = ("best", "checkpoints") if which == "best" else ("checkpoints",)
  for folder in folders:
    path = os.path.join(workdir, folder)
    if os.path.isdir(path) and any(n.isdigit() for n in os.listdir(path)):
      return True
  return False


def run_ablations(workdir: str, kinds: Sequence[str] = ("all",), split: Optional[str] = None,
                  limit: Optional[int] = None, out: Optional[str] = None, checkpoint: str = "best",
                  overwrite: bool = False, echo: Callable = print, notice: Optional[Callable] = None) -> list[dict]:
  """Restore `workdir` once, evaluate every ablation of `kinds` on one split, write `out` (default RUN/ablations).

  `split`: default the config's eval split; `limit`: default the config's
  example limit for that split (so the "none" row is the run's own evaluation),
  0 = every example. An explicitly asked kind that does not apply is an
  AblateError; with "all" it is skipped with a one-line `notice`. Returns the
  rows: {"kind", "ablation", "leaves", "metrics": {name: value}}.
  """
  notice = notice or (lambda line: print(line, file=sys.stderr, flush=True))
  out = files.check_output(out or os.path.join(workdir, "ablations"), overwrite=overwrite)
  config = run.read_config(workdir)
  method = objectives.method_of(config)
  explicit = "all" not in kinds
  wanted = [k for k in KINDS if not explicit or k in kinds]
  for k in kinds:
    if k != "all" and k not in KINDS:
      raise AblateError(f"unknown ablation kind {k!r}; expected one of {', '.join(KINDS)} or all")
  chosen = []
  for kind in wanted:
    reason = why_not(method, kind)
    if reason is None:
      chosen.append(kind)
    elif explicit:
      raise AblateError(not_applicable(method, kind, reason))
    else:
      notice(f"jft ablate: {not_applicable(method, kind, reason)}; skipped")
  if not has_checkpoint(workdir, checkpoint):
    raise AblateError(f"{workdir}: no checkpoint to ablate (nothing saved in checkpoints/ or best/)")

  r = run.restore(workdir, checkpoint)
  steps = []
  for kind in chosen:
    try:
      steps += plan(kind, r)
    except AblateError as e:
      if explicit:
        raise
      notice(f"jft ablate: {e}; skipped")
  d = config.data
  split = split or d.eval_split
  if limit is None:
    limit = {d.eval_split: d.max_eval_examples, d.test_split: d.max_test_examples}.get(split, 0)
  examples = examples_for(config, r.tokenizer, split, limit or None)
  shardings = r.init.shardings["trainable"]

  def measure(params):
    return evaluate_split(config, r.model, params, r.tokenizer, examples, mesh=r.init.mesh, reference=r.reference())

  rows = [{"kind": "none", "ablation": "none", "leaves": "", "metrics": measure(r.params())}]
  bar = None
  if sys.stderr.isatty():
    from tqdm import tqdm
    bar = tqdm(total=len(steps), desc="ablate", unit="ablation", dynamic_ncols=True)
  try:
    for kind, label, leaves, make in steps:
      what, tree = make()
      params = r.params(jax.device_put(tree, shardings)) if what == "trainable" else tree
      rows.append({"kind": kind, "ablation": label, "leaves": leaves, "metrics": measure(params)})
      if bar is not None:
        bar.set_postfix_str(label)
        bar.update(1)
  finally:
    if bar is not None:
      bar.close()
  names = metric_names(config, rows[0]["metrics"])
  header = (f"Ablations of {os.path.abspath(workdir)} ({method_label(method)}, {r.source} checkpoint, "
            f"step {r.step}) on {split}, {len(examples)} examples")
  coverage = None
  if any(row["kind"] == "layers" for row in rows):
    uncovered = [p for p in rules.flatten(r.trainable) if not p.startswith("layers/")]
    coverage = ("Layer ablations cover the trainable leaves under layers/"
                + (f"; not covered: {', '.join(uncovered)}" if uncovered else " (all of them)") + ".")
  write(out, rows, names, header, coverage)
  print(markdown(rows, names))
  return rows


def metric_names(config, metrics: dict) -> list[str]:
  """The config's eval.metric, then loss (those the evaluation gave)."""
  return [m for m in dict.fromkeys((config.eval.metric, "loss")) if m in metrics]


def table(rows: list[dict], names: Sequence[str]) -> list[list]:
  """Long rows: kind, ablation, metric, value, change against the unablated run, leaves changed."""
  none = rows[0]["metrics"]
  return [[row["kind"], row["ablation"], m, row["metrics"][m], row["metrics"][m] - none[m], row["leaves"]]
          for row in rows for m in names]


COLUMNS = ("kind", "ablation", "metric", "value", "change", "leaves")


def markdown(rows: list[dict], names: Sequence[str]) -> str:
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  for kind, label, m, value, change, leaves in table(rows, names):
    lines.append(f"| {kind} | {label} | {m} | {value:.6f} | {change:+.6f} | {leaves} |")
  return "\n".join(lines)


def write(out: str, rows: list[dict], names: Sequence[str], header: str, coverage: Optional[str]):
  """ablations.csv, ablations.md and one PNG per kind, written to a temporary folder and renamed into place."""
  def write_into(folder):
    os.makedirs(folder)
    with open(os.path.join(folder, "ablations.csv"), "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(COLUMNS)
      for row in table(rows, names):
        w.writerow(row[:3] + [repr(float(row[3])), repr(float(row[4]))] + row[5:])
    with open(os.path.join(folder, "ablations.md"), "w") as f:
      f.write(f"# {header}\n\n{markdown(rows, names)}\n" + (f"\n{coverage}\n" if coverage else ""))
    plot(folder, rows, names[0])

  files.write_folder(out, write_into)


def plot(folder: str, rows: list[dict], metric: str):
  """layers.png, modules.png (change, bars), rank.png, tokens.png (value against k, log2 x)."""

  plt = files.pyplot()

  none = rows[0]["metrics"][metric]
  for kind in KINDS:
    sel = [row for row in rows if row["kind"] == kind]
    if not sel:
      continue
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(sel) + 2), 3.2))
    if kind in ("layers", "modules"):
      labels = [row["ablation"].replace("module ", "").replace("layer ", "") for row in sel]
      changes = [row["metrics"][metric] - none for row in sel]
      colors = ["tab:gray" if row["ablation"] == "all layers" else "tab:blue" for row in sel]
      ax.bar(range(len(sel)), changes, color=colors)
      ax.set_xticks(range(len(sel)), labels, rotation=45 if kind == "modules" else 0, ha="right"
                    if kind == "modules" else "center")
      ax.axhline(0, color="black", linewidth=0.8)
      ax.set_xlabel("layer removed" if kind == "layers" else "module removed")
      ax.set_ylabel(f"{metric} change")
    else:
      ks = [int(row["ablation"].split()[-1]) for row in sel]
      ax.plot(ks, [row["metrics"][metric] for row in sel], marker="o")
      ax.axhline(none, color="gray", linestyle="--", linewidth=0.8, label="unablated")
      ax.set_xscale("log", base=2)
      ax.set_xticks(ks, [str(k) for k in ks])
      ax.set_xlabel("rank k" if kind == "rank" else "virtual tokens kept")
      ax.set_ylabel(metric)
      ax.legend()
    ax.set_title(f"{kind} ablation")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, f"{kind}.png"), dpi=100)
    plt.close(fig)
