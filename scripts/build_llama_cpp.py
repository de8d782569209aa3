"""Build llama-cpp-python from its source archive once, into a cached folder, and import it from there.

llama.cpp is the runtime jft's GGUF files are for, so the slow tests and `benchmarks/serve.py` check them
with it. It has no wheel for this machine and is never a dependency of jft: this script downloads the
pinned source archive from PyPI, compiles it (cmake and a C++ compiler; about 10 minutes on 2 cores) with
only the library and the Python bindings, into `~/.cache/jft/llama-cpp-python-VERSION` (or
`$JFT_LLAMA_CPP_CACHE`), and later calls reuse that folder. A lock file keeps two test workers from
building at once.

    python scripts/build_llama_cpp.py           # build (or find) it and print the folder
    python scripts/build_llama_cpp.py --server  # also the packages its OpenAI server needs (for the benchmark)
"""

from __future__ import annotations

import argparse
import fcntl
import importlib
import os
import subprocess
import sys

VERSION = "0.3.36"
# Only what the bindings load: no llama.cpp tools, tests, examples, server or curl, and no multimodal
# library (mtmd: imported only by the image chat handlers).
CMAKE_ARGS = ("-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF "
              "-DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF")
# Its own runtime needs beyond numpy/jinja2 (already in jft's environment), and its server's.
RUNTIME = ("diskcache>=5.6.1",)
SERVER = ("sse-starlette>=1.6.1", "starlette-context>=0.3.6,<0.4", "pydantic-settings>=2.0.1", "python-dotenv")


def folder() -> str:
  root = os.environ.get("JFT_LLAMA_CPP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jft")
  return os.path.join(root, f"llama-cpp-python-{VERSION}")


def _pip(*args: str, env=None):
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", *args],
                 check=True, env=env)


def build(server: bool = False) -> str:
  """The folder holding `llama_cpp`, built on the first call (under a lock), reused after."""
  target = folder()
  os.makedirs(os.path.dirname(target), exist_ok=True)
  with open(target + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    done = os.path.join(target, ".built")
    if not os.path.exists(done):
      env = dict(os.environ, CMAKE_ARGS=CMAKE_ARGS, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
      print(f"building llama-cpp-python {VERSION} from source into {target} (once; minutes)", file=sys.stderr)
      _pip("--no-deps", "--no-cache-dir", "--no-binary", "llama-cpp-python", "--target", target,
           f"llama-cpp-python=={VERSION}", env=env)  # no pip wheel cache: a wheel built with other CMAKE_ARGS
      _pip("--no-deps", "--target", target, *RUNTIME)
      open(done, "w").close()
    if server and not os.path.exists(os.path.join(target, ".server")):
      _pip("--no-deps", "--target", target, *SERVER)
      open(os.path.join(target, ".server"), "w").close()
  return target


def load(server: bool = False):
  """`import llama_cpp` from the cached build (building it first if needed)."""
  target = build(server)
  if target not in sys.path:
    sys.path.append(target)  # after the environment's own packages: the target's copies only fill gaps
  return importlib.import_module("llama_cpp")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--server", action="store_true", help="also install what llama_cpp.server needs")
  args = parser.parse_args(argv)
  print(os.path.dirname(load(args.server).__file__))
  return 0


if __name__ == "__main__":
  sys.exit(main())
