"""How the host's allocator should serve XLA:CPU's steps, and the one re-exec that applies it.

Why: XLA:CPU takes each call's temporaries as one block (1.5 GB for SmolLM2-135M's LoRA step at
8 x 128). glibc serves a block that large with a fresh `mmap` and unmaps it when the step ends,
so every step faults every page of it in again: 409k minor faults and 1.5 s of kernel time per
step on this 2-core machine, about 7% of the step. With one arena, no `mmap` and no trimming,
the freed block stays in the heap and the next step reuses it: no faults, the same peak RSS.

glibc reads these settings only when the process starts (a later `mallopt` leaves threads on the
arenas they already have; measured: the faults stay and RSS grows), so `jft train` and `jft sweep`
set them and re-execute themselves once. They cost compile time: with one arena XLA's compiler
threads share a lock, and compile-bound work (the test suite's files) ran 7-10% slower, so the
commands that mostly compile (estimate, export, ...) and the tests keep the system's defaults.
torch's step gains nothing from them (it frees many small buffers, which glibc already reuses),
so the race's peer runs without them.

Set `JFT_SYSTEM_MALLOC=1` to keep the system's defaults. Python API users can start a training
process under the settings with `python -m jft.host_memory python my_script.py`, or
`eval "$(python -m jft.host_memory)"` in their shell.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from typing import Mapping, Optional, Sequence

# glibc's environment names (still read by glibc 2.3x, beside GLIBC_TUNABLES).
SETTINGS = {
    "MALLOC_ARENA_MAX": "1",  # every thread allocates from the main heap, so a freed block is found again
    "MALLOC_MMAP_MAX_": "0",  # large blocks from the heap, not from mmap (which munmap gives back per step)
    "MALLOC_TRIM_THRESHOLD_": str(2**40),  # never hand the heap's free top back to the kernel
}
COMMANDS = {"train", "sweep"}  # the `jft` commands that run a compiled step many times
OPT_OUT = "JFT_SYSTEM_MALLOC"
APPLIED = "JFT_HOST_MEMORY"  # set in the re-executed process: re-exec at most once
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin",
                       "libtpu")


def wanted(environ: Mapping[str, str] = os.environ, has_module=None) -> Optional[str]:
  """None when the settings should be applied; else why not (for the tests and the curious)."""
  if environ.get(APPLIED):
    return "already applied"
  if environ.get(OPT_OUT, "0") not in ("", "0"):
    return f"{OPT_OUT} is set"
  if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
    return "not Linux with glibc"
  platforms = environ.get("JAX_PLATFORMS", "")
  if platforms and platforms.split(",")[0] != "cpu":
    return f"JAX_PLATFORMS={platforms}"
  has_module = has_module or (lambda name: importlib.util.find_spec(name) is not None)
  if not platforms and any(has_module(name) for name in ACCELERATOR_PLUGINS):
    return "an accelerator plugin is installed (its steps keep temporaries in device memory)"
  return None


def environment(environ: Mapping[str, str] = os.environ) -> dict:
  """`environ` with the settings added; a setting the user gave keeps the user's value."""
  return {**SETTINGS, **environ, APPLIED: "1"}


def reexec(args: Sequence[str]) -> None:
  """Replace this process by `python ARGS` under the settings, unless `wanted` says no (then return).

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
  """`python -m jft.host_memory CMD ARGS...` runs CMD under the settings; with no CMD, prints them as exports."""
  if argv:
    os.execvpe(argv[0], list(argv), environment())
  for key, value in {**SETTINGS, APPLIED: "1"}.items():
    print(f"export {key}={value}")


if __name__ == "__main__":
  main(sys.argv[1:])
