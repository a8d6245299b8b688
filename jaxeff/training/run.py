"""Loading a finished (or running) training run for inference."""

from __future__ import annotations

import pathlib
from typing import Optional

import jax
import yaml

from jaxeff import sharding as shd
from jaxeff.config import from_dict
from jaxeff.models.config import LMConfig
from jaxeff.models.lm import DecoderLM
from jaxeff.training.checkpointing import restore_params


def run_model(run_dir, *, dtype: Optional[str] = None) -> DecoderLM:
    """The model a run directory trained: its ``model.yaml`` architecture with the methods of its ``config.yaml``
    (e.g. Attention-Gate) applied."""
    run_dir = pathlib.Path(run_dir)
    model_file = run_dir / "model.yaml"
    if not model_file.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a training run directory (no model.yaml)")
    fields = yaml.safe_load(model_file.read_text())
    if dtype is not None:
        fields["dtype"] = dtype
    model = DecoderLM(from_dict(LMConfig, fields, "model"))
    config_file = run_dir / "config.yaml"
    run_cfg = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    if run_cfg.get("attention_gate") is not None:
        from jaxeff.methods.kv_eviction.attention_gate import AttentionGate

        model = model.with_methods(from_dict(AttentionGate, run_cfg["attention_gate"], "attention_gate"))
    return model


def load_run(run_dir, step: Optional[int] = None, mesh: Optional[jax.sharding.Mesh] = None, *,
             dtype: Optional[str] = None):
    """``(model, params, tokenizer)`` of a run directory written by ``jaxeff.training.train``.

    Args:
      run_dir: the run's ``output_dir`` (holds ``model.yaml``, ``config.yaml``, tokenizer files and
        ``checkpoints/``).
      step: the checkpoint step to load; None takes the latest finalised one.
      mesh: place the parameters sharded over this mesh (by the logical-axis rules); None puts them on the
        first device.
      dtype: override the compute dtype (``"float32"`` / ``"bfloat16"``); None keeps the trained one.

    Returns:
      ``model`` (``DecoderLM``, with the run's methods applied), ``params`` (the checkpoint's parameters, the
      methods' under ``params["methods"]``; only they are read, not the optimizer state) and ``tokenizer`` (a
      ``transformers`` fast tokenizer loaded from the run directory).

    Raises:
      FileNotFoundError: no run there, or no finalised checkpoint (or not ``step``).
    """
    run_dir = pathlib.Path(run_dir)
    model = run_model(run_dir, dtype=dtype)
    if mesh is None:
        mesh = shd.make_mesh(shd.MeshConfig(data=1), jax.devices()[:1])
    abstract = jax.eval_shape(model.init, jax.random.key(0))
    shardings = shd.tree_shardings(model.param_axes(), abstract, mesh)
    params, _ = restore_params(run_dir, abstract, shardings, step)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(run_dir), local_files_only=True)
    return model, params, tokenizer
