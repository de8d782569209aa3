"""A run folder: what a run needs to be reproduced, resumed, evaluated and exported.

    WORKDIR/config.json        the resolved config
    WORKDIR/versions.json      python and package versions, git commit
    WORKDIR/base.json          which base model (path, content hash) the adapter belongs to
    WORKDIR/metrics.jsonl      one JSON line per log/eval event
    WORKDIR/tb/                TensorBoard events
    WORKDIR/checkpoints/N/     orbax: trainable params, optimizer state, step, rng, data position
    WORKDIR/best/N/            the best trainable params by the validation metric
    WORKDIR/summary.md         a short human summary, written at the end

The model pieces of a run (`build_model`) are made here from the config, so
training, `jft eval`, `jft export` and `jft generate` build them the same way.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections

from jft import checkpoint, peft, quant
from jft.errors import JftError
from jft.models import load_pretrained, load_tokenizer
from jft.models.pretrained import resolve


class RunError(JftError, RuntimeError):
  pass


def write_json(path: str, obj):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, default=str)
  os.replace(tmp, path)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise RunError(f"{workdir}: not a run folder (no config.json)")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


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
  with open(path) as f:
    recorded = json.load(f)
  if recorded["sha256"] != identity["sha256"]:
    raise RunError(f"{workdir} was trained on base {recorded['path']} (sha256 {recorded['sha256'][:12]}...), "
                   f"but {identity['path']} has sha256 {identity['sha256'][:12]}...; refusing to mix them")


def build_model(config):
  """-> (model, base params (quantized if configured), method, tokenizer) from a run config."""
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.model.dtype]
  model, base = load_pretrained(config.model.name, dtype=dtype, remat=config.model.remat)
  if config.quant.format:
    base, _ = quant.quantize(base, ((r"layers/.*/kernel", config.quant.format),), blocksize=config.quant.blocksize,
                             double_quant=config.quant.double_quant)
  method = peft.build(config.method.name, **config.method.hparams.to_dict())
  return model, base, method, load_tokenizer(config.model.name)


def init_state(method, base, seed: int):
  """-> (trainable, frozen): the method's leaves added to the base and split once."""
  init = jax.jit(lambda rng, params: peft.split(method, method.init(rng, params)))
  return init(jax.random.PRNGKey(seed), base)


def make_tx(config, trainable):
  from jft.optim import make_optimizer
  return make_optimizer(config.optim, config.train.steps, trainable)


def state_template(config, trainable) -> dict:
  """The saved training state's structure (abstract): what a checkpoint holds."""
  tx = make_tx(config, trainable)
  return checkpoint.abstract({"trainable": trainable, "opt_state": jax.eval_shape(tx.init, trainable),
                              "step": jnp.zeros((), jnp.int32), "rng": jax.random.PRNGKey(0)})


def best_manager(workdir: str):
  return checkpoint.ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "best")),
      options=checkpoint.ocp.CheckpointManagerOptions(max_to_keep=1, create=True), item_names=("state", "meta"))


def restore_params(workdir: str, which: str = "best"):
  """-> (config, model, method, params as the model runs them, tokenizer) of a run.

  `which`: "best" (by the validation metric, if the run tracked one) or "latest".
  """
  config = read_config(workdir)
  model, base, method, tokenizer = build_model(config)
  check_base(workdir, base_identity(config.model.name))
  trainable, frozen = init_state(method, base, config.seed)
  best = best_manager(workdir) if which == "best" else None
  if best is not None and best.latest_step() is not None:
    _, state, _ = checkpoint.restore(best, {"trainable": checkpoint.abstract(trainable)})
  else:
    restored = checkpoint.restore(checkpoint.manager(workdir, keep=1), state_template(config, trainable))
    if restored is None:
      raise RunError(f"{workdir}: no checkpoint to restore")
    state = restored[1]
  params = method.materialize(peft.combine(state["trainable"], frozen))
  return config, method.configure(model), method, params, tokenizer
