"""Attention-Gate training jobs: continual pre-training (CPT) of the gates, and SFT (``jaxeff.training.sft``).

A job config is either

* a ``TrainConfig`` with an ``attention_gate:`` section (**CPT**): next-token training on the KJV corpus through
  ``jaxeff.training.train`` (gates only with ``train.trainable: methods``, our documented choice: the base model
  stays bit-identical, so the gates are a pure add-on to it); afterwards the held-out perplexity of the gated model
  and its eviction ratio are compared with the base model's (the ``init_from`` weights evaluated *without* the
  method on the same held-out windows) and the gates are saved alone in ``<output_dir>/gates``; or
* an ``SFTConfig`` (**SFT**): recognised by a top-level ``task:`` section, or ``job: sft``.

``job: cpt | sft`` may be given explicitly; without it the ``task`` section decides.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import sys
from collections.abc import Sequence
from typing import Union

import jax

from jaxeff import sharding as shd
from jaxeff.config import ConfigError, apply_overrides, config_error, from_dict, load_yaml
from jaxeff.data import kjv
from jaxeff.data.text import eval_windows, kjv_token_splits
from jaxeff.methods.kv_eviction.attention_gate import save_gates
from jaxeff.training.config import TrainConfig
from jaxeff.training.run import load_run
from jaxeff.training.sft import SFTConfig, check_init_from, train_sft
from jaxeff.training.steps import batch_sharding, jit_eval_step
from jaxeff.training.trainer import build_model_and_tokenizer, evaluate, train

JOBS = ("cpt", "sft")
RESULTS_FILE = "results.json"


def load_job_config(path, overrides: Sequence[str] = ()) -> Union[TrainConfig, SFTConfig]:
    """The job config of a YAML file plus ``key=value`` overrides: an ``SFTConfig`` when it has a ``task``
    section (or ``job: sft``), otherwise a ``TrainConfig`` that must have an ``attention_gate`` section."""
    data = apply_overrides(load_yaml(path) if path is not None else {}, overrides)
    job = data.pop("job", None)
    if job is None:
        job = "sft" if "task" in data else "cpt"
    if job not in JOBS:
        raise config_error("job", "one of 'cpt', 'sft' (or absent: 'sft' when a task section is given)", job)
    if job == "sft":
        return from_dict(SFTConfig, data)
    if "task" in data:
        raise config_error("task", "no task section for job 'cpt' (continual pre-training on the corpus)",
                           data["task"])
    cfg = from_dict(TrainConfig, data)
    if cfg.attention_gate is None:
        raise config_error("attention_gate", "the gate settings (a mapping; {} for the defaults) for Attention-Gate "
                           "continual pre-training", None)
    if cfg.init_from is None:
        raise config_error("init_from", "the pretrained model whose gates are trained (a run directory such as "
                           "runs/lm_tiny, a Hugging Face directory or 'smollm2')", None)
    return cfg


def heldout_perplexity(cfg: TrainConfig, model, params, tokenizer) -> tuple[float, float, dict]:
    """``(loss, perplexity, method metrics)`` of ``model`` on the held-out windows that ``train`` evaluates on."""
    mesh = shd.make_mesh(cfg.mesh)
    seq_len, bs = cfg.data.seq_len, cfg.train.eval_bs
    train_books, heldout_books = kjv.split_books(cfg.data.heldout_books, cfg.data.train_books)
    _, heldout = kjv_token_splits(tokenizer, train_books, heldout_books)
    n = (len(heldout) - 1) // seq_len
    count = (n // bs) * bs if cfg.train.eval_batches is None else cfg.train.eval_batches * bs
    windows = eval_windows(heldout, seq_len, count)
    param_sh = shd.tree_shardings(model.param_axes(), jax.eval_shape(model.init, jax.random.key(0)), mesh)
    params = jax.device_put(params, param_sh)
    step = jit_eval_step(model, mesh, param_sh, batch_sharding(mesh, bs, seq_len))
    return evaluate(step, params, windows, bs, mesh)


def run_cpt(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Trains the gates (``jaxeff.training.train``), saves them to ``<output_dir>/gates`` and returns (and writes
    to ``<output_dir>/results.json``) the held-out comparison: ``base_ppl`` (the ``init_from`` model without the
    method), ``gated_ppl``, ``gate_keep``, ``eviction_ratio`` (``1 - gate_keep``: the share of held-out
    (token, KV head) entries the gates evict), ``unigram_ppl``, and ``steps_this_call``, ``wall_time_s`` and
    ``tokens_per_s`` of this call (a call resumed at the final step trains nothing: its ``tokens_per_s`` is null)."""
    check_init_from(cfg.init_from)
    result = train(cfg, resume=resume, overwrite=overwrite)
    run_dir = pathlib.Path(result.run_dir)
    model, params, tokenizer = load_run(run_dir)
    if result.eval_ppl is not None and "gate_keep" in result.eval_metrics:  # the final evaluation of this call
        gated_ppl, metrics = result.eval_ppl, result.eval_metrics
    else:  # resumed at the final step: nothing was evaluated
        _, gated_ppl, metrics = heldout_perplexity(cfg, model, params, tokenizer)
    base_cfg = dataclasses.replace(cfg, attention_gate=None, gates_from=None,
                                   train=dataclasses.replace(cfg.train, trainable="all"))
    base_model, base_params, _ = build_model_and_tokenizer(base_cfg, shd.make_mesh(cfg.mesh))
    _, base_ppl, _ = heldout_perplexity(cfg, base_model, base_params, tokenizer)
    is_main = jax.process_index() == 0
    keep = float(metrics["gate_keep"])
    out = {"base_ppl": base_ppl, "gated_ppl": gated_ppl, "gate_keep": keep, "eviction_ratio": 1.0 - keep,
           "unigram_ppl": result.unigram_ppl, "steps": result.final_step, "trainable": cfg.train.trainable,
           "steps_this_call": result.final_step - result.start_step, "wall_time_s": result.wall_time_s,
           "tokens_per_s": result.tokens_per_s if math.isfinite(result.tokens_per_s) else None}
    if is_main:
        save_gates(run_dir / "gates", cfg.attention_gate, jax.device_get(params))
        (run_dir / RESULTS_FILE).write_text(json.dumps(out, indent=2) + "\n")
        print(f"[attention_gate] held-out perplexity: base model {base_ppl:.2f}, with Attention-Gate {gated_ppl:.2f} "
              f"while evicting {1.0 - keep:.1%} of the KV entries (unigram {result.unigram_ppl:.2f}); gates saved to "
              f"{run_dir / 'gates'}", file=sys.stderr)
    return out


def run_job(cfg: Union[TrainConfig, SFTConfig], *, resume: bool = False, overwrite: bool = False):
    """CPT (``run_cpt``) or SFT (``jaxeff.training.sft.train_sft``) by the config's type."""
    if isinstance(cfg, SFTConfig):
        return train_sft(cfg, resume=resume, overwrite=overwrite)
    if isinstance(cfg, TrainConfig):
        return run_cpt(cfg, resume=resume, overwrite=overwrite)
    raise ConfigError(f"expected a TrainConfig (CPT) or an SFTConfig, got {type(cfg).__name__}")


__all__ = ["heldout_perplexity", "load_job_config", "run_cpt", "run_job"]
