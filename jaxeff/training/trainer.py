"""The language-model training loop: data, sharded state, jitted steps, evaluation, metrics, checkpoints, resume.

    result = train(load_config(TrainConfig, "configs/lm_tiny.yaml"), resume=True)

A run directory holds::

    config.yaml                 the TrainConfig as run          model.yaml     the LMConfig actually trained
    tokenizer.json, tokenizer_config.json                       (``AutoTokenizer.from_pretrained(run_dir)``)
    metrics.jsonl, tb/          metrics (see ``jaxeff.training.metrics``)
    checkpoints/<step>/         Orbax: params, opt_state, meta (see ``jaxeff.training.checkpointing``)

Multi-process runs execute this same code in every process: every process builds the same global batch (the data
order is a pure function of seed and position) and transfers only its own shards; Orbax coordinates the saves;
only process 0 writes metrics, run files and the progress bar.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import shutil
import sys
import time
from typing import Optional

import jax
import numpy as np
import yaml
from tqdm.auto import tqdm

from jaxeff import sharding as shd
from jaxeff.config import ConfigError, config_error, to_dict
from jaxeff.data import kjv
from jaxeff.data.text import WindowSampler, eval_windows, kjv_bpe_tokenizer, kjv_token_splits, unigram_perplexity
from jaxeff.models.lm import DecoderLM
from jaxeff.training import checkpointing as ckpt
from jaxeff.training.config import TrainConfig, check_model_against_data, merge_runtime_fields
from jaxeff.training.metrics import TB_DIR, MetricsLogger, StepMetrics
from jaxeff.training.optim import lr_schedule, make_optimizer
from jaxeff.training.steps import (
    abstract_state,
    batch_sharding,
    init_state,
    jit_eval_step,
    jit_train_step,
    state_shardings,
)

# Testing aid: after this step the process stops making progress (sleeps) so a test can SIGKILL it at a known
# point (after the step's checkpoint save was issued and its metrics were written).
PAUSE_ENV = "JAXEFF_TEST_PAUSE_AT_STEP"


@dataclasses.dataclass
class TrainResult:
    """What a finished ``train`` call reports (the same numbers are in ``metrics.jsonl``)."""

    run_dir: str
    start_step: int
    final_step: int
    losses: dict  # {step: train loss}, steps run by this call
    eval_ppl: Optional[float]
    eval_loss: Optional[float]
    unigram_ppl: float
    tokens_per_s: float
    wall_time_s: float
    eval_metrics: dict = dataclasses.field(default_factory=dict)  # the methods' held-out metrics (gate_keep)


def initialize_distributed(cfg: TrainConfig) -> None:
    """``jax.distributed.initialize`` from ``cfg.distributed`` (no-op when disabled or already initialised).
    Must run before anything touches a JAX backend."""
    d = cfg.distributed
    if not d.enabled or jax.distributed.is_initialized():
        return
    if d.cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", d.cpu_collectives)
    if d.coordinator_address is None:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(
            coordinator_address=d.coordinator_address, num_processes=d.num_processes, process_id=d.process_id
        )


def resolve_init_from(init_from: str) -> pathlib.Path:
    """A pretrained model directory from ``init_from`` (``"smollm2"``: the shipped SmolLM2-135M): a Hugging Face
    directory (``config.json``) or a training run directory (``model.yaml``, its latest checkpoint)."""
    if init_from == "smollm2":
        from jaxeff import assets

        return pathlib.Path(assets.smollm2_path())
    path = pathlib.Path(init_from).expanduser()
    if not ((path / "config.json").is_file() or (path / "model.yaml").is_file()):
        raise ConfigError(
            f"config field 'init_from': expected 'smollm2', a Hugging Face model directory with config.json or a "
            f"training run directory with model.yaml, got {init_from!r}"
        )
    return path


def _load_base(pretrained_dir: pathlib.Path, mesh, load_weights: bool, runtime: dict):
    """``(LMConfig, params or None)`` of a pretrained HF directory or training run (base parameters only)."""
    if (pretrained_dir / "config.json").is_file():
        from jaxeff.checkpoint import load_pretrained, read_hf_config

        if load_weights:
            model, params = load_pretrained(pretrained_dir, mesh=mesh, **runtime)
            return model.config, params
        return read_hf_config(pretrained_dir, **runtime), None
    from jaxeff.training.run import load_run, run_model

    if load_weights:
        model, params, _ = load_run(pretrained_dir, mesh=mesh)
        params = {k: v for k, v in params.items() if k != "methods"}
        return dataclasses.replace(model.config, **runtime), params
    return dataclasses.replace(run_model(pretrained_dir).config, **runtime), None


def build_model_and_tokenizer(cfg: TrainConfig, mesh, load_weights: bool = True):
    """``(model, pretrained params or None, tokenizer)`` for the run. ``load_weights=False`` reads only the
    pretrained architecture (a resumed fine-tune takes its weights from its own checkpoint)."""
    params = None
    pretrained_dir = None
    if cfg.init_from is not None:
        pretrained_dir = resolve_init_from(cfg.init_from)
        m = cfg.model
        runtime = dict(dtype=m.dtype, param_dtype=m.param_dtype, scan_layers=m.scan_layers, remat=m.remat)
        pretrained_cfg, params = _load_base(pretrained_dir, mesh, load_weights, runtime)
        model = DecoderLM(merge_runtime_fields(pretrained_cfg, cfg.model))
    else:
        model = DecoderLM(cfg.model)

    kind = cfg.tokenizer_kind
    if kind == "bpe":
        train_books, _ = kjv.split_books(cfg.data.heldout_books, cfg.data.train_books)
        tokenizer = kjv_bpe_tokenizer(model.config.vocab_size, train_books)
    elif kind == "pretrained":
        from jaxeff.checkpoint import load_tokenizer

        tokenizer = load_tokenizer(pretrained_dir)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.data.tokenizer, local_files_only=True)
    check_model_against_data(model.config, cfg, len(tokenizer))
    if model.config.eos_token_id is None and tokenizer.eos_token_id is not None:
        # Recorded in the run's model.yaml, so generation from the run stops at end-of-text by default.
        model = DecoderLM(dataclasses.replace(model.config, eos_token_id=int(tokenizer.eos_token_id)))
    if cfg.methods:
        model = model.with_methods(*cfg.methods)
        if params is not None:  # pretrained base + freshly initialised (or saved) method parameters
            params = {**params, "methods": _init_methods(model, mesh, cfg.seed)}
            if cfg.gates_from is not None:
                params = with_saved_gates(cfg, model, params)
    return model, params, tokenizer


def _init_methods(model: DecoderLM, mesh, seed: int) -> dict:
    """The methods' parameters (``params["methods"]``), initialised straight into their shardings."""
    axes = model.param_axes()["methods"]
    key = jax.random.fold_in(jax.random.key(seed), 1)

    def make(k):
        keys = jax.random.split(k, len(model.methods))
        return {m.name: m.init(mk, model.config) for m, mk in zip(model.methods, keys)}

    abstract = jax.eval_shape(make, key)
    return jax.jit(make, out_shardings=shd.tree_shardings(axes, abstract, mesh))(key)


def with_saved_gates(cfg, model: DecoderLM, params: dict) -> dict:
    """``params`` with the Attention-Gate parameters replaced by the saved gates of ``cfg.gates_from`` (``cfg``: a
    ``TrainConfig`` or an ``SFTConfig``; its ``attention_gate`` must have the saved gates' heads and head_dim)."""
    from jaxeff.methods.kv_eviction.attention_gate import load_gates, with_gate_params
    from jaxeff.training.sft import resolve_gates_dir

    saved, gates = load_gates(resolve_gates_dir(cfg.gates_from), model.config)
    gate = cfg.attention_gate
    if (saved.heads, saved.head_dim) != (gate.heads, gate.head_dim):
        raise config_error("attention_gate.heads/head_dim", f"those of the gates in gates_from ({saved.heads} x "
                           f"{saved.head_dim})", (gate.heads, gate.head_dim))
    shardings = jax.tree.map(lambda x: x.sharding, params)
    return jax.device_put(with_gate_params(params, gates), shardings)


def _prepare_run_dir(cfg: TrainConfig, run_dir: pathlib.Path, resume: bool, overwrite: bool, is_main: bool) -> None:
    has_ckpt = ckpt.checkpoint_dir(run_dir).exists() and any(ckpt.checkpoint_dir(run_dir).iterdir())
    if has_ckpt and not resume and not overwrite:
        raise ConfigError(
            f"config field 'output_dir': expected a directory without checkpoints for a new run, got {str(run_dir)!r} "
            f"which has some; pass --resume to continue it, --overwrite to start over, or set output_dir=..."
        )
    if is_main:
        if overwrite and not resume:
            shutil.rmtree(ckpt.checkpoint_dir(run_dir), ignore_errors=True)
            shutil.rmtree(run_dir / TB_DIR, ignore_errors=True)
        run_dir.mkdir(parents=True, exist_ok=True)
    _sync("jaxeff_run_dir_ready")


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _pause_for_test(step: int, run_dir: pathlib.Path) -> None:
    want = os.environ.get(PAUSE_ENV)
    if want is not None and int(want) == step:
        (run_dir / f"paused_at_{step}").write_text(str(os.getpid()))
        while True:  # wait to be killed
            time.sleep(1.0)


def evaluate(eval_step, params, windows: np.ndarray, batch_size: int, mesh) -> tuple[float, float, dict]:
    """``(mean NLL per token, perplexity, methods' metrics)`` over all ``windows`` ``[N, T + 1]`` (``N`` a
    multiple of ``batch_size``); the sums are accumulated in float64 on the host, the methods' metrics (e.g.
    Attention-Gate's keep rate) averaged over batches."""
    total, count = 0.0, 0.0
    outs = [eval_step(params, shd.shard_host_batch(windows[i:i + batch_size], mesh))
            for i in range(0, len(windows), batch_size)]
    sums: dict = {}
    for s, c, m in outs:
        total += float(s)
        count += float(c)
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    loss = total / count
    return loss, math.exp(loss), {k: v / len(outs) for k, v in sums.items()}


def _describe_eval(metrics: dict) -> str:
    if "gate_keep" in metrics:
        return f", Attention-Gate keeps {metrics['gate_keep']:.1%} of the KV entries"
    return ""


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Runs (or, with ``resume``, continues from the latest finalised checkpoint) the training run ``cfg``."""
    t_start = time.time()
    initialize_distributed(cfg)
    is_main = jax.process_index() == 0
    run_dir = pathlib.Path(cfg.output_dir).absolute()
    loop = cfg.train

    cfg.validate(jax.device_count())
    mesh = shd.make_mesh(cfg.mesh)
    _prepare_run_dir(cfg, run_dir, resume, overwrite, is_main)

    resuming = resume and ckpt.latest_step(run_dir) is not None
    model, pretrained_params, tokenizer = build_model_and_tokenizer(cfg, mesh, load_weights=not resuming)
    mcfg = model.config

    # ---- data
    train_books, heldout_books = kjv.split_books(cfg.data.heldout_books, cfg.data.train_books)
    train_tokens, heldout_tokens = kjv_token_splits(tokenizer, train_books, heldout_books)
    seq_len = cfg.data.seq_len
    sampler = WindowSampler(train_tokens, seq_len, cfg.seed)
    recall = None
    if cfg.data.recall_rate > 0:
        from jaxeff.data.recall import RecallMixer

        try:
            recall = RecallMixer(tokenizer, seq_len, cfg.recall_split, cfg.data.recall_rate, seed=cfg.seed,
                                 min_gap=cfg.data.recall_min_gap)
        except ValueError as e:
            raise ConfigError(f"config field 'data.recall_rate': {e}") from None
    eval_bs = loop.eval_bs
    n_heldout = (len(heldout_tokens) - 1) // seq_len
    n_eval = (n_heldout // eval_bs) * eval_bs if loop.eval_batches is None else loop.eval_batches * eval_bs
    if n_eval == 0 or n_eval > n_heldout:
        raise ConfigError(
            f"config field 'train.eval_batches': expected at most {n_heldout // eval_bs} batches of {eval_bs} "
            f"held-out windows (the held-out split has {n_heldout} windows of {seq_len + 1} tokens), "
            f"got {loop.eval_batches}"
        )
    eval_set = eval_windows(heldout_tokens, seq_len, n_eval)
    unigram_ppl = unigram_perplexity(train_tokens, eval_set[:, 1:], len(tokenizer))

    if is_main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        (run_dir / "model.yaml").write_text(yaml.safe_dump(to_dict(mcfg), sort_keys=False))
        tokenizer.save_pretrained(str(run_dir))

    # ---- state
    tx = make_optimizer(cfg.optim, loop.steps, loop.trainable,
                        params=jax.eval_shape(model.init, jax.random.key(0)))
    schedule = lr_schedule(cfg.optim, loop.steps)
    shardings = state_shardings(model, tx, mesh)
    manager = ckpt.open_manager(run_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save) \
        if cfg.checkpoint.enabled or resume else None
    restored_step = manager.latest_step() if (resume and manager is not None) else None
    if restored_step is not None:
        abstract = abstract_state(model, tx)
        params, opt_state, meta = ckpt.restore(manager, abstract, shardings, restored_step)
        position = sampler.check_state(meta["data"])
        step_rng = jax.device_put(np.asarray(meta["rng"], np.uint32), shardings["rng"])
        state = {"params": params, "opt_state": opt_state,
                 "step": jax.device_put(np.int32(meta["step"]), shardings["step"]), "rng": step_rng}
        start_step = int(meta["step"])
        del pretrained_params
    else:
        if resume and is_main:
            print(f"[train] --resume: no checkpoint in {ckpt.checkpoint_dir(run_dir)}, starting from step 0",
                  file=sys.stderr)
        state = init_state(model, tx, jax.random.key(cfg.seed), shardings, params=pretrained_params)
        del pretrained_params
        position, start_step = 0, 0

    logger = MetricsLogger(run_dir, enabled=is_main, resume_step=restored_step)
    if restored_step is None:
        logger.log("baseline", 0, {"unigram_ppl": unigram_ppl, "train_tokens": int(len(train_tokens)),
                                   "heldout_eval_tokens": int(eval_set[:, 1:].size),
                                   "num_params": int(sum(x.size for x in jax.tree.leaves(state["params"])))})
    rng_data = [int(x) for x in np.asarray(jax.device_get(state["rng"])).reshape(-1)]

    # ---- compiled steps
    # Compiled ahead of the loop so that throughput figures exclude compilation.
    t_compile = time.time()
    bsh = batch_sharding(mesh, loop.batch_size, seq_len)
    esh = batch_sharding(mesh, eval_bs, seq_len)
    train_step = jit_train_step(model, tx, mesh, shardings, bsh, loop.grad_accum, trainable=loop.trainable).lower(
        state, jax.ShapeDtypeStruct((loop.batch_size, seq_len + 1), np.int32, sharding=bsh)).compile()
    eval_step = jit_eval_step(model, mesh, shardings["params"], esh).lower(
        state["params"], jax.ShapeDtypeStruct((eval_bs, seq_len + 1), np.int32, sharding=esh)).compile()
    compile_s = time.time() - t_compile

    def say(msg: str) -> None:
        if is_main:
            tqdm.write(msg, file=sys.stderr)

    say(f"[train] {mcfg.num_params() / 1e6:.2f}M params, mesh {dict(mesh.shape)}, {jax.process_count()} "
        f"process(es); train {len(train_tokens):,} tokens, held-out eval {eval_set[:, 1:].size:,} tokens; "
        f"unigram baseline held-out ppl {unigram_ppl:.2f}; compiled in {compile_s:.1f} s")
    if restored_step is not None:
        say(f"[train] resumed from checkpoint step {restored_step} (data position {position})")

    bar = tqdm(total=loop.steps, initial=start_step, disable=not (is_main and loop.progress), desc="train",
               dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
    steps = StepMetrics(logger, bar, schedule=schedule, units_per_step=loop.batch_size * seq_len,
                        rate_name="tokens_per_s", postfix=lambda v, r: dict(loss=f"{v['loss']:.3f}", tok_s=f"{r:,.0f}"))
    eval_loss = eval_ppl = None
    eval_metrics: dict = {}

    if loop.eval_at_start and restored_step is None:
        eval_loss, eval_ppl, eval_metrics = evaluate(eval_step, state["params"], eval_set, eval_bs, mesh)
        logger.log("eval", 0, {"loss": eval_loss, "ppl": eval_ppl, **eval_metrics})
        say(f"[train] step 0: held-out loss {eval_loss:.4f}, ppl {eval_ppl:.2f}{_describe_eval(eval_metrics)}")
        steps.restart_clock()

    for step in range(start_step + 1, loop.steps + 1):
        batch = sampler.batch(position, loop.batch_size)
        if recall is not None:
            batch = recall.apply(batch, position)
        position += loop.batch_size
        state, metrics = train_step(state, shd.shard_host_batch(batch, mesh))
        steps.add(step, metrics)
        last = step == loop.steps
        if step % loop.log_every == 0 or last:
            steps.flush()
        if (loop.eval_every and step % loop.eval_every == 0) or last:
            steps.flush()
            eval_loss, eval_ppl, eval_metrics = evaluate(eval_step, state["params"], eval_set, eval_bs, mesh)
            logger.log("eval", step, {"loss": eval_loss, "ppl": eval_ppl, **eval_metrics})
            logger.flush()
            say(f"[train] step {step}: held-out loss {eval_loss:.4f}, ppl {eval_ppl:.2f} "
                f"(unigram {unigram_ppl:.2f}){_describe_eval(eval_metrics)}")
            steps.restart_clock()
        if manager is not None and cfg.checkpoint.enabled and (
            (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or last
        ):
            steps.flush()
            ckpt.save(manager, state, {"step": step, "data": sampler.state(position), "rng": rng_data})
            steps.restart_clock()
        if PAUSE_ENV in os.environ:
            steps.flush()
            _pause_for_test(step, run_dir)

    bar.close()
    if manager is not None:
        manager.wait_until_finished()
        manager.close()
    tokens_per_s = steps.rate()
    wall = time.time() - t_start
    logger.log("final", loop.steps, {"eval_loss": eval_loss, "eval_ppl": eval_ppl, "unigram_ppl": unigram_ppl,
                                     "tokens_per_s": tokens_per_s, "wall_time_s": wall,
                                     **{f"eval_{k}": v for k, v in eval_metrics.items()}}, tb=False)
    logger.close()
    if eval_ppl is not None:
        say(f"[train] done in {wall:.1f} s: held-out ppl {eval_ppl:.2f} vs unigram {unigram_ppl:.2f}, "
            f"{tokens_per_s:,.0f} tokens/s")
    return TrainResult(
        run_dir=str(run_dir), start_step=start_step, final_step=loop.steps, losses=steps.losses, eval_ppl=eval_ppl,
        eval_loss=eval_loss, unigram_ppl=unigram_ppl, tokens_per_s=tokens_per_s, wall_time_s=wall,
        eval_metrics=eval_metrics,
    )
