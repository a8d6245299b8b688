"""Shared helpers for tests on tiny video DiT runs: 4 frames of 16x16 clips, patch (1, 4, 4) -> 4 x 16 tokens."""

from __future__ import annotations

import pathlib

from jaxeff.config import load_config
from jaxeff.training.vdit import VDiTTrainConfig

FRAMES, TOKENS_PER_FRAME = 4, 16  # batch 8: one clip per device of the 8 simulated ones
CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "vdit_tiny.yaml"

TINY_OVERRIDES = [
    "data.frames=4", "data.size=16", "data.eval_clips=8",
    "model.num_attention_heads=2", "model.attention_head_dim=16", "model.text_dim=16", "model.freq_dim=32",
    "model.ffn_dim=64", "model.num_layers=2", "model.rope_max_seq_len=16",
    "train.batch_size=8", "train.eval_batch_size=8", "train.log_every=2", "train.eval_every=2", "train.progress=false",
    "optim.warmup_steps=1", "diffusion.sample_steps=4",
    "checkpoint.every=2", "checkpoint.keep=3", "checkpoint.async_save=false",
]


def tiny_config(output_dir, steps: int = 4, extra=()) -> VDiTTrainConfig:
    return load_config(VDiTTrainConfig, CONFIG,
                       [f"output_dir={output_dir}", f"train.steps={steps}", *TINY_OVERRIDES, *extra])
