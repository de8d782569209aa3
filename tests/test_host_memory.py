"""The allocator settings for XLA:CPU (jft.host_memory): when they apply, and that they stop the per-step faults."""

import json
import os
import subprocess
import sys

import pytest

from jft import cli, host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_PLUGINS = lambda name: False

# A jitted call whose 128 MiB intermediate is an XLA temporary; prints the minor page faults of a
# later call, and the settings the process runs under. XLA frees a call's temporaries on its own
# thread just after the result is ready; the pause lets that happen before the next call, as the
# host's work between two training steps does (without it the next call may come first and take
# a second block).
PROBE = """
import json, os, resource, time
import jax, jax.numpy as jnp
x = jnp.ones((4096, 16)); w1 = jnp.ones((16, 8192)) / 16; w2 = jnp.ones((8192, 16)) / 8192
f = jax.jit(lambda x, w1, w2: jnp.sin(x @ w1) @ w2)
for _ in range(2):
  f(x, w1, w2).block_until_ready()
  time.sleep(0.2)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
f(x, w1, w2).block_until_ready()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"faults": faults, "pid": os.getpid(),
                  "env": {k: os.environ.get(k) for k in ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "JFT_HOST_MEMORY")}}))
"""


def test_applies_on_a_cpu_only_linux_host_and_not_elsewhere():
  if host_memory.wanted({}, NO_PLUGINS) == "not Linux with glibc":
    pytest.skip("not Linux with glibc")  # what the rest checks is only reachable on glibc
  assert host_memory.wanted({}, NO_PLUGINS) is None
  assert "already" in host_memory.wanted({"JFT_HOST_MEMORY": "1"}, NO_PLUGINS)
  assert "JFT_SYSTEM_MALLOC" in host_memory.wanted({"JFT_SYSTEM_MALLOC": "1"}, NO_PLUGINS)
  assert host_memory.wanted({"JFT_SYSTEM_MALLOC": "0"}, NO_PLUGINS) is None
  assert "JAX_PLATFORMS" in host_memory.wanted({"JAX_PLATFORMS": "cuda"}, NO_PLUGINS)
  assert host_memory.wanted({"JAX_PLATFORMS": "cpu"}, lambda name: True) is None  # forced to the CPU
  assert "plugin" in host_memory.wanted({}, lambda name: name == "jax_cuda12_plugin")


def test_a_setting_the_user_gave_keeps_its_value():
  env = host_memory.environment({"MALLOC_ARENA_MAX": "4", "HOME": "/h"})
  assert env["MALLOC_ARENA_MAX"] == "4" and env["HOME"] == "/h"
  assert env["MALLOC_MMAP_MAX_"] == "0" and env["JFT_HOST_MEMORY"] == "1"


def test_jft_train_reexecutes_itself_first(monkeypatch):
  seen = []

  def reexec(args):
    seen.append(list(args))
    raise SystemExit(0)

  monkeypatch.setattr(host_memory, "reexec", reexec)
  monkeypatch.setattr(sys, "argv", ["jft", "train", "--config", "c.py"])
  with pytest.raises(SystemExit):
    cli.main()
  assert seen == [["-m", "jft.cli", "train", "--config", "c.py"]]
  seen.clear()
  monkeypatch.setattr(sys, "argv", ["jft", "report"])  # not a training command: the system's defaults
  with pytest.raises(SystemExit):  # argparse: report needs a run folder
    cli.main()
  assert seen == []
  with pytest.raises(SystemExit):  # a library call with its own argv is left alone (parse error: no command)
    cli.main([])
  assert seen == []


def _probe(**env):
  code = f"from jft import host_memory; host_memory.reexec(['-c', {PROBE!r}]); exec({PROBE!r})"
  environ = {k: v for k, v in os.environ.items() if k not in (*host_memory.SETTINGS, host_memory.APPLIED)}
  environ.update(env, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_settings_stop_xla_temporaries_from_faulting_in_on_every_call():
  if host_memory.wanted({"JAX_PLATFORMS": "cpu"}) is not None:
    pytest.skip(host_memory.wanted({"JAX_PLATFORMS": "cpu"}))
  plain = _probe(JFT_SYSTEM_MALLOC="1")
  tuned = _probe()
  assert plain["env"]["JFT_HOST_MEMORY"] is None
  assert tuned["env"] == {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "JFT_HOST_MEMORY": "1"}
  # glibc maps the 128 MiB temporary afresh on each call (32,768 pages) unless the settings keep it
  assert plain["faults"] > 16_000, plain
  assert tuned["faults"] < plain["faults"] / 20, (plain, tuned)


def test_the_module_runs_a_command_under_the_settings():
  environ = {k: v for k, v in os.environ.items() if k not in (*host_memory.SETTINGS, host_memory.APPLIED)}
  out = subprocess.run([sys.executable, "-m", "jft.host_memory", sys.executable, "-c",
                        "import os; print(os.environ['MALLOC_MMAP_MAX_'], os.environ['JFT_HOST_MEMORY'])"],
                       env={**environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=60)
  assert out.stdout.split() == ["0", "1"], out.stderr
