"""Two processes x 4 CPU devices on localhost, on JAX's own runtime (jax.distributed, gloo collectives).

Every process runs the same `jft train ... --coordinator HOST:PORT --num-processes 2 --process-id I`,
reads only its rows of each global batch, and checkpoints its shards with orbax; only process 0
writes logs. Both processes are SIGKILLed mid-run; the run resumes on two processes with the
losses of an uninterrupted run, and the same checkpoint resumes on one process with another mesh.
"""

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import jft.run.checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
STEPS = 30
MESH_2x4 = ["--config.train.mesh.data=2", "--config.train.mesh.fsdp=2", "--config.train.mesh.tensor=2"]
MESH_1x4 = ["--config.train.mesh.data=1", "--config.train.mesh.fsdp=2", "--config.train.mesh.tensor=2"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(shardable_model, workdir, processes=2, mesh=MESH_2x4, resume=False, steps=STEPS):
  args = ["train", "--config", TINY, f"--config.model.name={shardable_model}", f"--config.train.steps={steps}",
          "--config.train.save_every=2", "--config.train.eval_every=10", "--config.eval.zero_shot=false",
          *mesh, "--workdir", workdir] + (["--resume"] if resume else [])
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  port = free_port()
  procs = []
  for i in range(processes):
    join = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes), "--process-id", str(i)]
    procs.append(subprocess.Popen([sys.executable, "-m", "jft.cli", *args, *(join if processes > 1 else [])],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  return procs


def finish(procs, timeout=600):
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err[-3000:]
    outs.append((out, err))
  return outs


def losses(workdir) -> dict:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  train = [r for r in records if r["kind"] == "train"]
  assert len({r["step"] for r in train}) == len(train), "a step was logged twice"
  return {r["step"]: r["loss"] for r in train}


def test_two_processes_train_like_one(shardable_model, tmp_path):
  """Each process reads only its rows; losses and evaluation match one process on another mesh."""
  two, one = str(tmp_path / "two"), str(tmp_path / "one")
  outs = finish(launch(shardable_model, two, steps=6))
  assert "run folder" in outs[0][0] and "run folder" not in outs[1][0]  # only process 0 reports
  finish(launch(shardable_model, one, processes=1, mesh=MESH_1x4, steps=6))
  a, b = losses(two), losses(one)
  assert sorted(a) == sorted(b) == list(range(1, 7))
  for step in a:
    assert abs(a[step] - b[step]) <= 1e-5 * abs(b[step]), (step, a[step], b[step])
  evals = [[json.loads(line) for line in open(os.path.join(w, "metrics.jsonl")) if '"test"' in line][0]
           for w in (two, one)]
  assert abs(evals[0]["loss"] - evals[1]["loss"]) <= 1e-5 * evals[1]["loss"]
  assert evals[0]["accuracy"] == evals[1]["accuracy"]
  layout = json.load(open(os.path.join(two, "shardings.json")))
  assert layout["mesh"]["processes"] == 2 and layout["mesh"]["shape"] == {"data": 2, "fsdp": 2, "tensor": 2}

  # Checksums of each step are written once (process 0), after both processes' shards are in.
  mngr = jft.run.checkpoint.manager(two, None)
  assert mngr.steps() == [2, 4, 6] and all(mngr.problem(s) is None for s in mngr.steps())


@pytest.mark.slow
def test_two_processes_kill_resume_and_restore_on_another_mesh(shardable_model, tmp_path):
  reference = str(tmp_path / "reference")
  outs = finish(launch(shardable_model, reference))
  expected = losses(reference)
  assert sorted(expected) == list(range(1, STEPS + 1))
  assert "run folder" in outs[0][0] and "run folder" not in outs[1][0]  # only process 0 reports
  layout = json.load(open(os.path.join(reference, "shardings.json")))
  assert layout["mesh"]["processes"] == 2 and layout["mesh"]["shape"] == {"data": 2, "fsdp": 2, "tensor": 2}
  assert os.path.isfile(os.path.join(reference, "summary.md"))

  # SIGKILL both processes after a checkpoint, mid-run.
  killed = str(tmp_path / "killed")
  procs = launch(shardable_model, killed)
  deadline = time.time() + 600
  while not os.path.isdir(os.path.join(killed, "checkpoints", "4")):
    assert all(p.poll() is None for p in procs) and time.time() < deadline, "ended before its step-4 checkpoint"
    time.sleep(0.05)
  for p in procs:
    p.send_signal(signal.SIGKILL)
  for p in procs:
    p.wait()
  with open(os.path.join(killed, "metrics.jsonl")) as f:
    assert len(f.readlines()) < STEPS, "the run finished before it was killed"
  on_one = str(tmp_path / "on_one_process")
  shutil.copytree(killed, on_one)

  # Resume on two processes: the losses of the uninterrupted run, bit for bit.
  finish(launch(shardable_model, killed, resume=True))
  assert losses(killed) == expected

  # The same checkpoint, restored by one process onto a (1, 2, 2) mesh of 4 devices.
  (out, err), = finish(launch(shardable_model, on_one, processes=1, mesh=MESH_1x4, resume=True))
  resumed_at = int((out + err).split("resumed from step ")[1].split()[0])
  got = losses(on_one)
  assert resumed_at >= 4 and sorted(got) == list(range(1, STEPS + 1))
  nxt = resumed_at + 1
  assert abs(got[nxt] - expected[nxt]) <= 1e-5 * abs(expected[nxt]), (nxt, got[nxt], expected[nxt])

  # A flipped byte in the newest step of a two-process run: both processes resume from the step before
  # (named), set the broken one aside, and redo the steps after it exactly.
  mngr = jft.run.checkpoint.manager(reference, None)
  newest = mngr.steps()[-1]
  shard = sorted(glob.glob(os.path.join(reference, "checkpoints", str(newest), "state", "ocdbt.process_*", "d",
                                        "*")))[-1]
  with open(shard, "r+b") as f:
    f.seek(os.path.getsize(shard) // 2)
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0xFF]))
  (out, err), _ = finish(launch(shardable_model, reference, resume=True))
  before = mngr.steps()[-2] if len(mngr.steps()) > 1 else None
  assert f"checkpoints/{newest} is corrupt" in out + err and f"resumed from step {before}" in out + err
  assert len(glob.glob(os.path.join(reference, "corrupt", f"checkpoints-{newest}-*", "WHY.txt"))) == 1
  assert losses(reference) == expected
