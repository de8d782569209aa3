"""Meshes and shardings: the one place that decides where arrays live.

A mesh has named axes (`data`, `fsdp`, `tensor`); `-1` takes the remaining
devices, so one device is simply the trivial mesh. Every parameter has
logical axis names (`embed`, `heads`, `mlp`, `vocab`, `layers`, ...): the
model states them for its own weights (`transformer.PARAM_AXES`), a method
for the leaves it adds (`Method.logical_axes`, following the base kernel).
A rule table maps logical names to mesh axes (t5x/MaxText style); the same
`AXIS_RULES` give pure data parallelism on a `(n, 1, 1)` mesh, ZeRO-3 FSDP on
`(1, n, 1)` and FSDP + tensor parallelism on `(1, f, t)`. Optimizer state is
sharded like its parameter; a quantized kernel's arrays like the dense kernel.

Nothing falls back silently: a logical name without a rule, a spec longer
than an array, a mesh axis used twice, or a dimension the mesh axes do not
divide is a `ShardingError` naming the path, the mesh and the dimension.

Batches are split over (`data`, `fsdp`). In a multi-process run every process
builds only its rows of a global batch (`process_rows`) and `global_batch`
assembles them with `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import threading
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jft import quant
from jft.core import files, rules
from jft.models.transformer import PARAM_AXES
from jft.core.errors import JftError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis (or a tuple of them, or None = replicated). First match wins.
AXIS_RULES = (
    # parameters
    ("layers", None),          # the scanned layer axis is never split
    ("embed", "fsdp"),         # ZeRO-3: every weight's model dimension over fsdp
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("rank", None),            # LoRA's rank axis
    ("adapter", None),         # bottleneck width
    ("virtual", None),         # prefix / prompt virtual tokens
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),       # the residual stream between layers
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


class ShardingError(JftError, ValueError):
  pass


# ----------------------------------------------------------------------------
# Mesh and processes
# ----------------------------------------------------------------------------

def make_mesh(shape: Mapping | None = None, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh over all devices (of every process); -1 = the rest."""
  devices = list(devices if devices is not None else jax.devices())
  shape = dict(shape or {"data": -1})
  unknown = sorted(set(shape) - set(AXES))
  if unknown:
    raise ShardingError(f"mesh {shape}: unknown axis {unknown}; axes are {AXES}")
  sizes = [int(shape.get(a, 1)) for a in AXES]
  if any(s == 0 or s < -1 for s in sizes):
    raise ShardingError(f"mesh {shape}: sizes must be positive or -1")
  known = math.prod(s for s in sizes if s != -1)
  if sizes.count(-1) > 1 or len(devices) % known:
    raise ShardingError(f"mesh {shape} does not fit {len(devices)} devices")
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != len(devices):
    raise ShardingError(f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, have {len(devices)}")
  return Mesh(np.asarray(devices).reshape(sizes), AXES)


def describe(mesh: Mesh) -> dict:
  return {"shape": dict(mesh.shape), "devices": int(mesh.size), "processes": jax.process_count(),
          "platform": mesh.devices.flat[0].platform}


DEFAULT_DISTRIBUTED_TIMEOUT = 300  # seconds a process waits for every process of the run to join
_JAX_TIMEOUT_GRACE = 60  # JAX's own timeout is longer: on it JAX aborts the process, so ours must come first


class DistributedError(ShardingError):
  """A multi-process run's flags that cannot work, or processes that did not all join in time."""


def check_distributed_flags(coordinator: str | None = None, num_processes: int | None = None,
                            process_id: int | None = None, distributed: bool = False,
                            timeout: float | None = None):
  """The multi-process flags of `jft train`, checked before anything starts (no JAX call): either
  `--coordinator HOST:PORT --num-processes N --process-id I` together, I in 0..N-1, or `--distributed`
  alone (the scheduler's environment says all three); `--distributed-timeout` only with one of them."""
  given = [flag for flag, value in (("--coordinator", coordinator), ("--num-processes", num_processes),
                                    ("--process-id", process_id)) if value is not None]
  if timeout is not None:
    if not 0 < timeout < math.inf:
      raise DistributedError(f"--distributed-timeout {timeout:g}: expected a positive number of seconds")
    if coordinator is None and not distributed:
      raise DistributedError(f"--distributed-timeout {timeout:g} needs a multi-process run: --coordinator HOST:PORT "
                             "--num-processes N --process-id I, or --distributed")
  if distributed and given:
    raise DistributedError(f"--distributed reads the run from the scheduler's environment: drop {' and '.join(given)}, "
                           "or drop --distributed and pass --coordinator, --num-processes and --process-id")
  if num_processes is not None and num_processes < 1:
    raise DistributedError(f"--num-processes {num_processes}: must be >= 1")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise DistributedError(f"--process-id {process_id} is not in [0, {num_processes}) (--num-processes "
                           f"{num_processes}: ids 0 .. {num_processes - 1})")
  if process_id is not None and process_id < 0:
    raise DistributedError(f"--process-id {process_id}: must be >= 0")
  if coordinator is None:
    if given:
      raise DistributedError(f"{' and '.join(given)} without --coordinator HOST:PORT (process 0's address): the run "
                             "would be one process; pass all three flags, or --distributed under a scheduler")
    return
  if num_processes is None or process_id is None:
    raise DistributedError("--coordinator needs --num-processes and --process-id")
  host, sep, port = coordinator.rpartition(":")
  if not sep or not host or not port.isdigit():
    raise DistributedError(f"--coordinator {coordinator!r}: expected HOST:PORT, process 0's address and a free port "
                           "(e.g. 10.0.0.1:1234)")
  if ":" in host and not (host.startswith("[") and host.endswith("]")):
    raise DistributedError(f"--coordinator {coordinator!r}: an IPv6 host goes in brackets ([::1]:{port})")
  if not 1 <= int(port) <= 65535:
    raise DistributedError(f"--coordinator {coordinator}: port {port} is not in 1..65535")


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, timeout: float = DEFAULT_DISTRIBUTED_TIMEOUT):
  """Join a multi-process run with JAX's own runtime (`jax.distributed`).

  With a coordinator address all three values are given by the caller;
  without, JAX detects them from the scheduler's environment (SLURM, Cloud
  TPU, Kubernetes indexed jobs, Open MPI). On CPU, collectives go over gloo.

  Prints one line to stderr, then waits at most `timeout` seconds for every
  process to join; past it, a `DistributedError` names the coordinator, this
  process and the timeout. (JAX itself would abort the process on its own
  timeout: the join runs in a thread, JAX's timeout set `_JAX_TIMEOUT_GRACE`
  seconds later. After the error the process cannot join again: exit it.)
  """
  check_distributed_flags(coordinator, num_processes, process_id, distributed=coordinator is None, timeout=timeout)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator is None:
    print(f"waiting for the processes of the scheduler's run (--distributed) ... up to {timeout:g} s",
          file=sys.stderr, flush=True)
    kwargs = {}
  else:
    print(f"waiting for {num_processes} processes at {coordinator} (process {process_id}) ... up to {timeout:g} s",
          file=sys.stderr, flush=True)
    kwargs = dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
  done, failure = threading.Event(), []

  def join():
    try:
      jax.distributed.initialize(**kwargs, initialization_timeout=math.ceil(timeout) + _JAX_TIMEOUT_GRACE)
    except BaseException as e:  # handed to the waiting thread
      failure.append(e)
    finally:
      done.set()

  threading.Thread(target=join, name="jft-distributed-join", daemon=True).start()
  if not done.wait(timeout):
    if coordinator is None:
      raise DistributedError(f"--distributed: timed out after {timeout:g} s (--distributed-timeout) waiting for the "
                             "processes of the scheduler's run to join")
    check = ("were the other processes started" if process_id == 0 else f"is process 0 running at {coordinator}, "
             "and was every process started")
    raise DistributedError(f"--coordinator {coordinator}: process {process_id} timed out after {timeout:g} s "
                           f"(--distributed-timeout) waiting for all {num_processes} processes to join; {check} with "
                           "the same --coordinator and --num-processes?")
  if not failure:
    return
  e = failure[0]
  if not isinstance(e, (ValueError, RuntimeError)):
    raise e
  if coordinator is None:
    raise DistributedError(f"--distributed: JAX found no cluster to join ({e}); outside SLURM, Cloud TPU, "
                           "Kubernetes or Open MPI pass --coordinator HOST:PORT --num-processes N --process-id I"
                           ) from None
  why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  hint = f"; is port {coordinator.rpartition(':')[2]} free on this host?" if process_id == 0 else ""
  raise DistributedError(f"--coordinator {coordinator}: process {process_id} of {num_processes} could not join "
                         f"({why}){hint}") from e


def is_primary() -> bool:
  """Process 0 writes logs, TensorBoard events and summaries; every process checkpoints."""
  return jax.process_index() == 0


# ----------------------------------------------------------------------------
# Logical axes -> PartitionSpecs
# ----------------------------------------------------------------------------

def logical_axes(params, method=None) -> dict:
  """{path: logical axis names} for every leaf: the model's table, then the method's leaves."""
  flat = rules.flatten(params)
  base = rules.assign(PARAM_AXES, flat, default=None, require_all_rules_match=False)
  out = {}
  for path, leaf in flat.items():
    axes = base[path]
    if axes is None and method is not None:
      axes = method.logical_axes(path, leaf, base.get)
    if axes is None:
      raise ShardingError(f"{path}: no logical axes (neither the model's PARAM_AXES nor method "
                          f"{getattr(method, 'name', None)!r} names them)")
    axes = tuple(axes)
    if len(axes) != len(leaf.shape):
      raise ShardingError(f"{path}: logical axes {axes} do not fit the array's shape {tuple(leaf.shape)}")
    out[path] = axes
  return out


def normalize_rules(axis_rules) -> tuple:
  """Rules as tuples (a config read back from JSON holds lists)."""
  as_entry = lambda m: tuple(m) if isinstance(m, list) else m
  return tuple((name, as_entry(m)) for name, m in axis_rules)


def _mesh_axes(name, axis_rules, where):
  for logical, mesh_axes in axis_rules:
    if logical == name:
      return mesh_axes
  raise ShardingError(f"{where}: logical axis {name!r} has no rule in the axis rules "
                      f"({', '.join(str(r[0]) for r in axis_rules)}); add ({name!r}, MESH_AXIS or None)")


def check_spec(path: str, shape: Sequence[int], spec: P, mesh: Mesh, logical: Sequence | None = None):
  """Rank fits, no mesh axis twice, every split dimension divisible: else a named error."""
  if len(spec) > len(shape):
    raise ShardingError(f"{path}: spec {spec} has more axes than the array's shape {tuple(shape)}")
  used = []
  for dim, entry in enumerate(spec):
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    for name in names:
      if name not in mesh.shape:
        raise ShardingError(f"{path}: spec {spec} names mesh axis {name!r}; the mesh has {tuple(mesh.shape)}")
      if name in used:
        raise ShardingError(f"{path}: spec {spec} uses mesh axis {name!r} twice")
      used.append(name)
    size = math.prod(mesh.shape[n] for n in names)
    if shape[dim] % size:
      what = f" ({logical[dim]!r})" if logical is not None and dim < len(logical) else ""
      raise ShardingError(
          f"{path}: dimension {dim}{what} of size {shape[dim]} does not divide over mesh axes {names} "
          f"({size} devices) of mesh {dict(mesh.shape)}; change the mesh or map that logical axis to None")
  return spec


def _layer_axes(axes) -> int:
  n = 0
  while n < len(axes) and axes[n] == "layers":
    n += 1
  return n


def param_specs(params, mesh: Mesh, method=None, axis_rules=AXIS_RULES, overrides=()) -> dict:
  """Tree of PartitionSpecs (a QuantizedTensor gets a QuantizedTensor of specs).

  `overrides` are path rules `(regex, spec)` whose spec is written for one
  layer's array: the scanned layer axes are prepended unsplit, so a rule
  for a kernel never shards the stacked axis by accident.
  """
  axis_rules = normalize_rules(axis_rules)
  logical = logical_axes(params, method)
  flat = rules.flatten(params)
  overrides = tuple((r, P(*(tuple(e) if isinstance(e, list) else e for e in s))) for r, s in overrides)
  chosen = rules.assign(overrides, flat, default=None,
                        require_all_rules_match=True, what="sharding override") if overrides else {}
  out = {}
  for path, leaf in flat.items():
    axes = logical[path]
    spec = chosen.get(path)
    if spec is None:
      spec = P(*(_mesh_axes(a, axis_rules, path) if a is not None else None for a in axes))
    else:
      spec = P(*((None,) * _layer_axes(axes)), *spec)
    check_spec(path, leaf.shape, spec, mesh, axes)
    if quant.is_quantized(leaf):
      specs = quant.partition_specs(leaf, spec, where=path)
      for child, child_spec in zip(quant.QuantizedTensor.tree_flatten(leaf)[0],
                                   quant.QuantizedTensor.tree_flatten(specs)[0]):
        if child is not None:
          check_spec(f"{path} (quantized {leaf.fmt}, block {leaf.blocksize})", child.shape, child_spec, mesh)
      spec = specs
    out[path] = spec
  return rules.unflatten(out)


def _is_spec(x):
  return isinstance(x, P)


def to_shardings(specs, mesh: Mesh):
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)


def param_shardings(params, mesh: Mesh, method=None, axis_rules=AXIS_RULES, overrides=()):
  return to_shardings(param_specs(params, mesh, method, axis_rules, overrides), mesh)


def _dict_path(keypath) -> str:
  return "/".join(str(k.key) for k in keypath if isinstance(k, jax.tree_util.DictKey))


def opt_state_shardings(abstract_opt_state, trainable_shardings, mesh: Mesh):
  """Each optimizer-state leaf sharded like the parameter it belongs to.

  Optax states hold trees shaped like the params (Adam's moments, gradient
  accumulators); a leaf is matched to its parameter by its dict path. Counts
  and other scalars are replicated; Adafactor's factored moments drop the
  reduced axis from the parameter's spec.
  """
  by_path = rules.flatten(jax.tree.map(lambda s: s, trainable_shardings))

  def one(keypath, leaf):
    path = _dict_path(keypath)
    param = by_path.get(path)
    shape = tuple(leaf.shape)
    if param is None:
      if math.prod(shape) <= 1 or not path:
        return NamedSharding(mesh, P())
      raise ShardingError(f"optimizer state {jax.tree_util.keystr(keypath)} {shape}: no parameter at {path!r}")
    spec = tuple(param.spec) + (None,) * 8
    if math.prod(shape) <= 1:
      return NamedSharding(mesh, P())
    n = len(shape)
    for candidate in (spec[:n], spec[: n - 1] + spec[n:n + 1], spec[:n - 1]):
      if len(candidate) == n and _divides(shape, candidate, mesh):
        return NamedSharding(mesh, P(*candidate))
    return NamedSharding(mesh, P())  # a small factored statistic that the parameter's axes do not divide

  return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def _divides(shape, spec, mesh) -> bool:
  for dim, entry in zip(shape, spec):
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    if dim % math.prod(mesh.shape[n] for n in names):
      return False
  return True


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put(tree, shardings):
  """Place host or single-device arrays with the given shardings, in every process.

  Each process passes the same full values (the base loads everywhere) and
  keeps only the shards its devices hold.
  """
  def one(x, s):
    if isinstance(x, jax.Array) and x.sharding == s:
      return x
    if jax.process_count() == 1:
      return jax.device_put(x, s)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda index: host[index])
  return jax.tree.map(one, tree, shardings)


# ----------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------

def batch_size_divides(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def check_batch(mesh: Mesh, batch_size: int, what: str = "train.batch_size"):
  n = batch_size_divides(mesh)
  if batch_size % n:
    raise ShardingError(f"{what}={batch_size} does not divide over the batch axes data x fsdp = {n} of mesh "
                        f"{dict(mesh.shape)}; use a multiple of {n}")


def process_rows(mesh: Mesh, batch_size: int) -> tuple[int, int]:
  """[lo, hi): the rows of every global batch that this process's devices hold."""
  check_batch(mesh, batch_size)
  index = batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
  spans = sorted({(s[0].start or 0, batch_size if s[0].stop is None else s[0].stop) for s in index.values()})
  lo, hi = spans[0][0], max(s[1] for s in spans)
  covered = sum(b - a for a, b in spans)
  if covered != hi - lo:
    raise ShardingError(f"mesh {dict(mesh.shape)}: this process's devices hold non-contiguous rows {spans}")
  return lo, hi


def global_batch(mesh: Mesh, local: Mapping[str, np.ndarray], batch_size: int) -> dict:
  """This process's rows -> global arrays split over the batch axes."""
  sh = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sh, np.asarray(v), (batch_size, *np.shape(v)[1:]))
          for k, v in local.items()}


def host_batch(mesh: Mesh, full: Mapping[str, np.ndarray]) -> dict:
  """A batch every process built whole (evaluation) -> global arrays; each keeps its rows."""
  b = len(next(iter(full.values())))
  lo, hi = process_rows(mesh, b)
  return global_batch(mesh, {k: np.asarray(v)[lo:hi] for k, v in full.items()}, b)


# ----------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ActivationSharding:
  """Pins activations to mesh axes by logical name (the model's `Settings.sharding`).

  Called at layer boundaries so XLA's SPMD partitioner keeps the batch split
  over (data, fsdp) and the hidden features over tensor instead of
  replicating them. Static and hashable: it is part of the model.
  """
  mesh: Mesh
  axis_rules: tuple

  def spec(self, axes) -> P:
    return P(*(None if a is None else _mesh_axes(a, self.axis_rules, "activation") for a in axes))

  def __call__(self, x, axes):
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, self.spec(axes)))


def activation_sharding(mesh: Mesh, axis_rules=AXIS_RULES) -> ActivationSharding | None:
  """None on a one-device mesh (nothing to pin)."""
  return None if mesh.size == 1 else ActivationSharding(mesh, normalize_rules(axis_rules))


# ----------------------------------------------------------------------------
# Where arrays live (shardings.json)
# ----------------------------------------------------------------------------

def _per_device_bytes(shape, dtype, spec, mesh) -> int:
  n = math.prod(shape) * np.dtype(dtype).itemsize
  for entry in spec:
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    n //= math.prod(mesh.shape[a] for a in names)
  return int(n)


def layout(trees: Mapping[str, Any], mesh: Mesh) -> dict:
  """{mesh, leaves: [{group, path, spec, shape, dtype, bytes_per_device}], per_device totals} of trees
  whose leaves carry shardings (arrays or ShapeDtypeStructs)."""
  leaves, totals = [], {}
  for group, tree in trees.items():
    total = 0
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      sharding = getattr(leaf, "sharding", None)
      spec = sharding.spec if isinstance(sharding, NamedSharding) else P()
      nbytes = _per_device_bytes(leaf.shape, leaf.dtype, spec, mesh)
      total += nbytes
      leaves.append({"group": group, "path": _keystr(keypath), "spec": [_spec_json(e) for e in spec],
                     "shape": list(leaf.shape), "dtype": str(leaf.dtype), "bytes_per_device": nbytes})
    totals[group] = total
  return {"mesh": describe(mesh), "per_device_bytes": totals, "leaves": leaves}


def _spec_json(entry):
  return entry if entry is None or isinstance(entry, str) else list(entry)


def _keystr(keypath) -> str:
  parts = []
  for k in keypath:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    else:
      parts.append(str(k))
  return "/".join(parts)


def write_layout(path: str, trees: Mapping[str, Any], mesh: Mesh, extra: Mapping | None = None) -> dict:
  report = {**layout(trees, mesh), **(extra or {})}
  files.write_json(path, report, indent=1)
  return report
