"""Exact resume: a run SIGKILLed mid-way and resumed from its last checkpoint ends with the same per-step losses as
an uninterrupted run; half-written checkpoints are ignored; the finished run loads for inference."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import yaml

from jaxeff.config import ConfigError, from_dict
from jaxeff.training import TrainConfig, load_run, read_metrics, train
from jaxeff.training.trainer import PAUSE_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_RUN = {
    "model": {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4,
              "num_kv_heads": 2, "max_position_embeddings": 64},
    "data": {"seq_len": 32, "train_books": ["Ruth", "Esther"], "heldout_books": ["Jonah"]},
    "optim": {"lr": 3e-3, "warmup_steps": 2},
    "train": {"steps": 12, "batch_size": 8, "log_every": 3, "eval_every": 0, "eval_batches": 2,
              "eval_batch_size": 8, "progress": False},
    "checkpoint": {"every": 4, "keep": 2},
}


def _write_config(path, output_dir, **changes):
    data = yaml.safe_load(yaml.safe_dump(TINY_RUN))
    for section, values in changes.items():
        data[section].update(values)
    data["output_dir"] = str(output_dir)
    path.write_text(yaml.safe_dump(data))
    return from_dict(TrainConfig, data)


def _cli(config_path, *extra, env=None):
    cmd = [sys.executable, "-m", "train.lm", "--config", str(config_path), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(pred, proc, timeout, what):
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"trainer exited ({proc.returncode}) before {what}:\n{err[-4000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"timed out waiting for {what}:\n{err[-4000:]}")
        time.sleep(0.1)


def _train_losses(run_dir):
    recs = read_metrics(run_dir, "train")
    steps = [r["step"] for r in recs]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["loss"] for r in recs}


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    ref_cfg = _write_config(tmp_path / "ref.yaml", tmp_path / "ref")
    cfg_path = tmp_path / "run.yaml"
    run_dir = tmp_path / "run"
    cfg = _write_config(cfg_path, run_dir)

    # The interrupted run: pauses after step 10 (checkpoints 4 and 8 were issued), then is SIGKILLed.
    proc = _cli(cfg_path, env={PAUSE_ENV: "10"})
    ref = train(ref_cfg)  # the uninterrupted reference, in this process meanwhile
    ckpts = run_dir / "checkpoints"
    _wait_for(lambda: (run_dir / "paused_at_10").exists(), proc, 300, "step 10")
    _wait_for(lambda: (ckpts / "8" / "commit_success.txt").exists(), proc, 60, "checkpoint 8 to be finalised")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert sorted(p.name for p in ckpts.iterdir()) == ["4", "8"]
    assert max(_train_losses(run_dir)) == 10  # steps 9 and 10 ran past the last checkpoint

    # A save killed half-way leaves a temporary directory; resume must ignore it.
    half = ckpts / "12.orbax-checkpoint-tmp"
    (half / "params").mkdir(parents=True)
    (half / "params" / "garbage").write_bytes(b"\x00" * 100)

    with pytest.raises(ConfigError, match=r"'output_dir'.*--resume"):
        train(cfg)  # an existing run is never silently overwritten

    proc = _cli(cfg_path, "--resume")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    assert "resumed from checkpoint step 8" in err, err[-4000:]

    losses, ref_losses = _train_losses(run_dir), ref.losses
    assert sorted(losses) == list(range(1, 13)) and sorted(ref_losses) == list(range(1, 13))
    for step in range(1, 13):
        assert abs(losses[step] - ref_losses[step]) <= 1e-6, (step, losses[step], ref_losses[step])
    assert losses[12] < losses[1]
    (final,) = read_metrics(run_dir, "eval")[-1:]
    assert final["step"] == 12 and final["ppl"] == pytest.approx(ref.eval_ppl, rel=1e-6)
    assert sorted(p.name for p in ckpts.iterdir()) == ["12", "8"]  # keep=2, temporary directory cleaned up

    # The finished run loads for inference: same parameters as the reference, a working tokenizer.
    model, params, tok = load_run(run_dir)
    _, ref_params, _ = load_run(ref.run_dir)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    _, params8, _ = load_run(run_dir, step=8)
    assert not np.allclose(np.asarray(params8["final_norm"]["scale"]), np.asarray(params["final_norm"]["scale"]))
    with pytest.raises(FileNotFoundError, match="step 5 is not a checkpoint"):
        load_run(run_dir, step=5)

    import jaxeff

    prompt = tok("And Jonah said")["input_ids"]
    generated = jaxeff.generate(model, params, [prompt], max_new_tokens=3, stop_tokens=[])
    first = int(np.argmax(np.asarray(model.apply(params, np.asarray([prompt], np.int32)))[0, -1]))
    assert int(generated[0, 0]) == first  # greedy decoding continues with the model's own argmax
    assert model.config.eos_token_id == tok.eos_token_id  # generation stops at end-of-text by default

    # init_from: the run exported as a Hugging Face checkpoint starts a fine-tune whose step-0 held-out loss is the
    # finished run's (same weights, same tokenizer and held-out windows), not a random model's.
    from jaxeff.checkpoint import save_pretrained

    hf_dir = tmp_path / "hf"
    save_pretrained(model, params, hf_dir, tokenizer=tok)
    _write_config(tmp_path / "ft.yaml", tmp_path / "ft", train={"steps": 2, "eval_at_start": True},
                  checkpoint={"enabled": False}, optim={"lr": 1e-4, "warmup_steps": 1})
    ft_cfg = from_dict(TrainConfig, {**yaml.safe_load((tmp_path / "ft.yaml").read_text()), "init_from": str(hf_dir)})
    ft = train(ft_cfg)
    (start,) = [r for r in read_metrics(ft.run_dir, "eval") if r["step"] == 0]
    assert start["loss"] == pytest.approx(final["loss"], abs=1e-5)
    assert not (tmp_path / "ft" / "checkpoints").exists()
