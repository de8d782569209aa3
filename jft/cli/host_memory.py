"""How the host's allocator should serve XLA:CPU's steps, and the one re-exec that applies it.

Why: XLA:CPU takes each call's temporaries as one block (1.5 GB for SmolLM2-135M's LoRA step at
8 x 128). glibc serves a block that large with a fresh `mmap` and unmaps it when the step ends,
so every step faults every 4 KiB page of it in again: 409k minor faults and 1.3-1.6 s of kernel
time per step on this 2-core machine. glibc's `hugetlb` tunable asks the kernel for transparent
huge pages on those mappings (`madvise(MADV_HUGEPAGE)`): 2 MiB per fault, 3-6k faults and
0.4-0.6 s of kernel time per step, fewer TLB misses in the matmuls, the same peak RSS.

glibc reads its tunables only when the process starts, so `jft train` and `jft sweep` set it and
re-execute themselves once. It only matters where the kernel's transparent huge pages are in
`madvise` mode (with `always` every large mapping gets them already; with `never` none can).
The race's peer runs without it, as torch users do.

Tried first and not kept: one arena with no `mmap` and no trimming (`MALLOC_ARENA_MAX=1
MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_`) reuses the block and removes the faults, but grew
full fine-tuning's peak RSS from 3.6 to 6.5 GB (the heap fragments) and slowed compiles 7-10%.

Set `JFT_SYSTEM_MALLOC=1` to keep the system's defaults. Python API users can start a training
process under the setting with `python -m jft.cli.host_memory python my_script.py` (`make test` runs
pytest so), or `eval "$(python -m jft.cli.host_memory)"` in their shell.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from typing import Mapping, Optional, Sequence

TUNABLE = "glibc.malloc.hugetlb=1"  # glibc >= 2.35: madvise(MADV_HUGEPAGE) on what malloc maps
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
COMMANDS = {"train", "sweep", "serve"}  # the `jft` commands that run a compiled step many times
OPT_OUT = "JFT_SYSTEM_MALLOC"
APPLIED = "JFT_HOST_MEMORY"  # set in the re-executed process: re-exec at most once
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin",
                       "libtpu")


def wanted(environ: Mapping[str, str] = os.environ, has_module=None, thp_mode=None, host=None) -> Optional[str]:
  """None when the setting should be applied; else why not (for the tests and the curious).

  `has_module`, `thp_mode` and `host` (`(sys.platform, libc, libc version)`) default to this machine's.
  """
  if environ.get(APPLIED):
    return "already applied"
  if environ.get(OPT_OUT, "0") not in ("", "0"):
    return f"{OPT_OUT} is set"
  system, libc, version = host or (sys.platform, *platform.libc_ver())
  if not system.startswith("linux") or libc != "glibc":
    return "not Linux with glibc"
  if tuple(int(v) for v in version.split(".")[:2] if v.isdigit()) < (2, 35):
    return f"glibc {version} has no hugetlb tunable (2.35+)"
  mode = thp_mode if thp_mode is not None else transparent_huge_pages()
  if mode != "madvise":
    return f"transparent huge pages are {mode!r}, not 'madvise'"
  platforms = environ.get("JAX_PLATFORMS", "")
  if platforms and platforms.split(",")[0] != "cpu":
    return f"JAX_PLATFORMS={platforms}"
  has_module = has_module or (lambda name: importlib.util.find_spec(name) is not None)
  if not platforms and any(has_module(name) for name in ACCELERATOR_PLUGINS):
    return "an accelerator plugin is installed (its steps keep temporaries in device memory)"
  return None


def transparent_huge_pages() -> str:
  """The kernel's THP mode (`always`, `madvise`, `never`), or `unknown`."""
  try:
    with open(THP_MODE) as f:
      return f.read().split("[", 1)[1].split("]", 1)[0]
  except (OSError, IndexError):
    return "unknown"


def environment(environ: Mapping[str, str] = os.environ) -> dict:
  """`environ` with the tunable added to GLIBC_TUNABLES; a hugetlb value the user gave stays."""
  tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
  if not any(t.startswith("glibc.malloc.hugetlb=") for t in tunables):
    tunables.append(TUNABLE)
  return {**environ, "GLIBC_TUNABLES": ":".join(tunables), APPLIED: "1"}


def reexec(args: Sequence[str]) -> None:
  """Replace this process by `python ARGS` under the setting, unless `wanted` says no (then return).

  Call it first thing in a command's `main`, before JAX starts its threads. The process keeps its
  id, so shells, schedulers and `jax.distributed` launchers see no difference.
  """
  if wanted() is not None:
    return
  env = environment()
  package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)  # this same jft
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *args], env)


def main(argv: Sequence[str]) -> None:
  """`python -m jft.cli.host_memory CMD ARGS...` runs CMD under the setting; with no CMD, prints it as exports."""
  env = environment()
  if argv:
    os.execvpe(argv[0], list(argv), env)
  for key in ("GLIBC_TUNABLES", APPLIED):
    print(f"export {key}={env[key]}")


if __name__ == "__main__":
  main(sys.argv[1:])
