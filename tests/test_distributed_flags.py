"""`jft train`'s multi-process flags: checked before anything starts, and a join that cannot complete
(no process 0 anywhere) ends with a named error after --distributed-timeout instead of waiting forever."""

import os
import socket
import subprocess
import sys
import time

import pytest

from jft.models import sharding
from jft.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
# The flags are checked before the config's model is read: a model that does not exist is never reached.
TRAIN = ["train", "--config", TINY, "--config.model.name=/nonexistent/model", "--workdir", "/nonexistent/run"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize("flags,message", [
    (["--num-processes", "2", "--process-id", "5"], "--process-id 5 is not in [0, 2)"),  # was: one process, silently
    (["--num-processes", "2", "--process-id", "1"], "--num-processes and --process-id without --coordinator"),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "5"],
     "--process-id 5 is not in [0, 2) (--num-processes 2: ids 0 .. 1)"),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "-1"], "--process-id -1 is not in"),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "0", "--process-id", "0"],
     "--num-processes 0: must be >= 1"),
    (["--coordinator", "127.0.0.1:1234"], "--coordinator needs --num-processes and --process-id"),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2"],
     "--coordinator needs --num-processes and --process-id"),
    (["--process-id", "0"], "--process-id without --coordinator"),
    (["--coordinator", "127.0.0.1", "--num-processes", "2", "--process-id", "0"],
     "--coordinator '127.0.0.1': expected HOST:PORT"),
    (["--coordinator", ":1234", "--num-processes", "2", "--process-id", "0"],
     "--coordinator ':1234': expected HOST:PORT"),
    (["--coordinator", "host:http", "--num-processes", "2", "--process-id", "0"], "expected HOST:PORT"),
    (["--coordinator", "127.0.0.1:0", "--num-processes", "2", "--process-id", "0"],
     "--coordinator 127.0.0.1:0: port 0 is not in 1..65535"),
    (["--coordinator", "127.0.0.1:70000", "--num-processes", "2", "--process-id", "0"],
     "port 70000 is not in 1..65535"),
    (["--coordinator", "::1:1234", "--num-processes", "2", "--process-id", "0"], "an IPv6 host goes in brackets"),
    (["--distributed", "--process-id", "1"], "--distributed reads the run from the scheduler's environment: drop "
                                             "--process-id"),
    (["--distributed-timeout", "5"], "--distributed-timeout 5 needs a multi-process run"),
    (["--distributed", "--distributed-timeout", "0"], "--distributed-timeout 0: expected a positive number of seconds"),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "1", "--distributed-timeout", "-3"],
     "--distributed-timeout -3: expected a positive"),
])
def test_bad_flags_exit_2_naming_the_flag(capsys, flags, message):
  rc = main([*TRAIN, *flags])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and err.startswith("jft train: error: ") and message in err and len(err.splitlines()) == 1, err


def test_good_flags_pass_the_check():
  sharding.check_distributed_flags("127.0.0.1:1234", 2, 1, timeout=5)
  sharding.check_distributed_flags("[::1]:1234", 1, 0)
  sharding.check_distributed_flags(distributed=True, timeout=30)
  sharding.check_distributed_flags()


def test_no_process_0_times_out_with_a_named_error(tmp_path):
  """Process 1 of 2 with nobody at the coordinator: the waiting line, then exit 2 after the timeout.
  (jax.distributed.initialize runs once per process: a fresh one.)"""
  coordinator = f"127.0.0.1:{free_port()}"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  t0 = time.time()
  p = subprocess.run([sys.executable, "-m", "jft.cli", "train", "--config", TINY, f"--config.model.name={tmp_path}",
                      "--workdir", str(tmp_path / "run"), "--coordinator", coordinator, "--num-processes", "2",
                      "--process-id", "1", "--distributed-timeout", "5"],
                     env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
  elapsed = time.time() - t0
  assert p.returncode == 2, p.stderr[-3000:]
  assert f"waiting for 2 processes at {coordinator} (process 1) ... up to 5 s" in p.stderr
  errors = [line for line in p.stderr.splitlines() if line.startswith("jft train: error:")]
  assert len(errors) == 1 and errors[0].startswith(
      f"jft train: error: --coordinator {coordinator}: process 1 timed out after 5 s (--distributed-timeout) "
      "waiting for all 2 processes to join"), p.stderr[-3000:]
  assert elapsed < 60, elapsed
