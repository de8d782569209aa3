"""The allocator setting for XLA:CPU (jft.cli.host_memory): when it applies, and that it cuts the per-step faults."""

import json
import os
import subprocess
import sys

import pytest

from jft import cli
from jft.cli import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_PLUGINS = lambda name: False

# A jitted call whose 128 MiB intermediate is an XLA temporary; prints the minor page faults of a
# later call, and the settings the process runs under.
PROBE = """
import json, os, resource
import jax, jax.numpy as jnp
x = jnp.ones((4096, 16)); w1 = jnp.ones((16, 8192)) / 16; w2 = jnp.ones((8192, 16)) / 8192
f = jax.jit(lambda x, w1, w2: jnp.sin(x @ w1) @ w2)
for _ in range(2):
  f(x, w1, w2).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
f(x, w1, w2).block_until_ready()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"faults": faults, "pid": os.getpid(),
                  "env": {k: os.environ.get(k) for k in ("GLIBC_TUNABLES", "JFT_HOST_MEMORY")}}))
"""


def test_applies_on_a_cpu_only_linux_host_and_not_elsewhere():
  want = lambda env, has=NO_PLUGINS, thp="madvise", host=("linux", "glibc", "2.36"): \
      host_memory.wanted(env, has, thp, host)
  assert want({}) is None
  assert "glibc" in want({}, host=("darwin", "", "")) and "glibc" in want({}, host=("linux", "musl", "1.2"))
  assert "2.35" in want({}, host=("linux", "glibc", "2.31"))
  assert "already" in want({"JFT_HOST_MEMORY": "1"})
  assert "JFT_SYSTEM_MALLOC" in want({"JFT_SYSTEM_MALLOC": "1"})
  assert want({"JFT_SYSTEM_MALLOC": "0"}) is None
  assert "JAX_PLATFORMS" in want({"JAX_PLATFORMS": "cuda"})
  assert want({"JAX_PLATFORMS": "cpu"}, lambda name: True) is None  # forced to the CPU
  assert "plugin" in want({}, lambda name: name == "jax_cuda12_plugin")
  assert "'always'" in want({}, thp="always") and "'never'" in want({}, thp="never")


def test_the_tunable_joins_the_users_tunables():
  env = host_memory.environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "HOME": "/h"})
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1" and env["HOME"] == "/h"
  assert env["JFT_HOST_MEMORY"] == "1"
  assert host_memory.environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})["GLIBC_TUNABLES"] == \
      "glibc.malloc.hugetlb=0"  # the user's choice stays


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
  environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.APPLIED)}
  environ.update(env, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_setting_cuts_the_faults_of_xla_temporaries_on_every_call():
  if host_memory.wanted({"JAX_PLATFORMS": "cpu"}) is not None:  # e.g. THP 'always'/'never', or an old glibc
    assert _probe()["env"] == {"GLIBC_TUNABLES": None, "JFT_HOST_MEMORY": None}  # runs as it is, no re-exec
    return
  plain = _probe(JFT_SYSTEM_MALLOC="1")
  tuned = _probe()
  assert plain["env"]["JFT_HOST_MEMORY"] is None
  assert tuned["env"] == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", "JFT_HOST_MEMORY": "1"}
  # glibc maps the 128 MiB temporary afresh on each call: 32,768 faults of 4 KiB, or 64 of 2 MiB
  assert plain["faults"] > 16_000, plain
  assert tuned["faults"] < plain["faults"] / 20, (plain, tuned)


def test_the_module_runs_a_command_under_the_setting():
  environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.APPLIED)}
  out = subprocess.run([sys.executable, "-m", "jft.cli.host_memory", sys.executable, "-c",
                        "import os; print(os.environ['GLIBC_TUNABLES'], os.environ['JFT_HOST_MEMORY'])"],
                       env={**environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=60)
  assert out.stdout.split() == ["glibc.malloc.hugetlb=1", "1"], out.stderr
