"""Several hosts: two local processes (4 CPU devices each, gloo collectives, ``jax.distributed``) form one 8-device
mesh and run the real trainer (``python -m train.lm``); their losses equal a one-process run on 8 devices."""

import os
import socket
import subprocess
import sys

import pytest
import yaml

from jaxeff.config import from_dict
from jaxeff.training import TrainConfig, read_metrics, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUN = {
    "model": {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4,
              "num_kv_heads": 2, "max_position_embeddings": 64},
    "data": {"seq_len": 32, "train_books": ["Ruth", "Esther"], "heldout_books": ["Jonah"]},
    "optim": {"lr": 3e-3, "warmup_steps": 1},
    "train": {"steps": 4, "batch_size": 8, "log_every": 2, "eval_every": 0, "eval_batches": 2,
              "eval_batch_size": 8, "progress": False},
    # Every axis crosses the process boundary somewhere: data parallel, FSDP and tensor parallel at once.
    "mesh": {"data": 2, "fsdp": 2, "tensor": 2},
    "checkpoint": {"every": 2, "keep": 2},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    ref = train(from_dict(TrainConfig, {**RUN, "output_dir": str(tmp_path / "ref")}))  # 8 local devices

    cfg_path = tmp_path / "run.yaml"
    run_dir = tmp_path / "multi"
    cfg_path.write_text(yaml.safe_dump({**RUN, "output_dir": str(run_dir)}))
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    procs = []
    for pid in range(2):
        overrides = ["distributed.enabled=true", f"distributed.coordinator_address=127.0.0.1:{port}",
                     "distributed.num_processes=2", f"distributed.process_id={pid}",
                     "distributed.cpu_collectives=gloo"]
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "train.lm", "--config", str(cfg_path), *overrides], cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=240))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for pid, (p, (_, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {pid} failed ({p.returncode}):\n{err[-4000:]}"
    assert "2 process(es)" in outputs[0][1] and "'data': 2, 'fsdp': 2, 'expert': 1, 'tensor': 2" in outputs[0][1]
    assert "[train]" not in outputs[1][1]  # only process 0 reports

    recs = read_metrics(run_dir, "train")
    assert [r["step"] for r in recs] == [1, 2, 3, 4]  # written once (process 0), not once per process
    for r in recs:
        assert r["loss"] == pytest.approx(ref.losses[r["step"]], abs=1e-5), r
    (ev,) = read_metrics(run_dir, "eval")
    assert ev["ppl"] == pytest.approx(ref.eval_ppl, rel=1e-5)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["2", "4"]
    assert (run_dir / "checkpoints" / "4" / "commit_success.txt").exists()
