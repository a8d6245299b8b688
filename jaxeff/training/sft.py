"""Supervised fine-tuning on a labelled task, with and without Attention-Gate: accuracy and eviction ratio together.

    cfg = load_config(SFTConfig, "configs/ag_tiny_sft.yaml")
    result = train_sft(cfg)          # result.arms["gated"]["accuracy"], ["eviction_ratio"]; ["base"]["accuracy"]

The paper's SFT comparison is AG + LoRA against LoRA alone on one task (Llama2-7B on RTE). Here both arms start from
the same pretrained model (``init_from``) and see the same examples in the same order with the same optimizer:

* ``gated``: the model with :class:`AttentionGate` (fresh gates, or gates from a CPT run via ``gates_from``); the
  eviction loss is added to the answer loss.
* ``base`` (``compare: true``): the same fine-tune without gates.

``train.trainable`` applies to both: ``all`` (default) fine-tunes the whole model in both arms (our stand-in for
the paper's LoRA: the same base adaptation in both arms, the gated arm adds the gates); ``methods`` trains only
the gates on a frozen base, and the ``base`` arm is then the frozen model evaluated as it is.

The loss is the answer's NLL (the targets after the prompt only, summed over the label's tokens, averaged over
examples: every example's decision token has the same weight whatever its label's token count). The task data comes
from :mod:`jaxeff.data.tasks`. The state, optimizer, shardings, checkpoints (exact resume: the data state is one
integer) and metrics reuse :mod:`jaxeff.training`; each arm's directory is a run directory
(``load_run(output_dir / "gated")`` gives the fine-tuned model with its gates).

Run directory::

    config.yaml        this SFTConfig (``job: sft``)      results.json   accuracy / eviction ratio of each arm
    task.json          the split (verse ranges) and answer tokens
    gated/, base/      config.yaml (the arm as a TrainConfig), model.yaml, tokenizer, metrics.jsonl, tb/,
                       checkpoints/; gated/gates/ (``save_gates``)
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from tqdm.auto import tqdm

from jaxeff import sharding as shd
from jaxeff.config import ConfigError, config_error, to_dict
from jaxeff.data.tasks import BookClassification, KJVBooksTask
from jaxeff.methods.kv_eviction.attention_gate import (
    GATES_FILE,
    AttentionGate,
    save_gates,
)
from jaxeff.models.config import LMConfig
from jaxeff.models.lm import DecoderLM
from jaxeff.sharding import MeshConfig
from jaxeff.training import checkpointing as ckpt
from jaxeff.training.config import (
    CheckpointConfig,
    DataConfig,
    DistributedConfig,
    LoopConfig,
    OptimConfig,
    TrainConfig,
)
from jaxeff.training.loss import method_losses
from jaxeff.training.metrics import TB_DIR, MetricsLogger, StepMetrics, read_metrics
from jaxeff.training.optim import lr_schedule, make_optimizer
from jaxeff.training.steps import abstract_state, init_state, replicated, state_shardings, trainable_mask
from jaxeff.training.trainer import build_model_and_tokenizer, initialize_distributed, with_saved_gates

ARMS = ("gated", "base")
RESULTS_FILE = "results.json"


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """A fine-tuning comparison on a labelled task (see the module docstring).

    Attributes:
      task: the labelled task (``jaxeff.data.tasks.KJVBooksTask``).
      init_from: the pretrained model: a training run directory (e.g. ``runs/lm_tiny``), a Hugging Face
        directory, or ``"smollm2"``. Its tokenizer is used.
      attention_gate: the gate settings of the gated arm (``{}``: the defaults).
      gates_from: start the gates from saved ones (a directory written by ``save_gates`` or a CPT run directory
        with ``gates/``) instead of fresh ones; their ``heads``/``head_dim`` must match ``attention_gate``.
      compare: also run the ``base`` arm (the same fine-tune without gates).
      model: only the runtime fields apply (``dtype``, ``param_dtype``, ``remat``, ``scan_layers``).
      optim, train, mesh, checkpoint, distributed, output_dir, seed: as in ``TrainConfig``
        (``train.eval_batches`` caps the test batches; ``train.trainable``: see the module docstring).
    """

    task: KJVBooksTask
    init_from: str
    attention_gate: AttentionGate
    gates_from: Optional[str] = None
    compare: bool = True
    model: LMConfig = LMConfig(vocab_size=512)
    optim: OptimConfig = OptimConfig()
    train: LoopConfig = LoopConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    distributed: DistributedConfig = DistributedConfig()
    output_dir: str = "runs/ag_sft"
    seed: int = 0

    def __post_init__(self):
        if self.attention_gate.keep_ratio is not None or self.attention_gate.budget is not None:
            raise config_error("attention_gate.keep_ratio/budget", "null (training and the accuracy evaluation "
                               "use the thresholded flags; budgets are an inference-time setting)",
                               {"keep_ratio": self.attention_gate.keep_ratio, "budget": self.attention_gate.budget})
        if self.attention_gate.prefill != "masked":
            raise config_error("attention_gate.prefill", "'masked' (the SFT job scores the answer after the prompt "
                               "in one forward pass with in-context eviction; prefill: dense is trained by CPT)",
                               self.attention_gate.prefill)
        for arm in self.arms:
            self.arm_config(arm)  # TrainConfig's own checks (warmup < steps, ...)

    @property
    def arms(self) -> tuple[str, ...]:
        return ARMS if self.compare else ARMS[:1]

    def trains(self, arm: str) -> bool:
        """Whether ``arm`` has parameters to train (the base arm has none with ``trainable: methods``)."""
        return arm == "gated" or self.train.trainable == "all"

    def arm_config(self, arm: str) -> TrainConfig:
        """The arm as a ``TrainConfig`` (model, tokenizer and method construction reuse the LM trainer's; written
        to the arm's directory so that ``load_run`` rebuilds the model, with gates or without)."""
        return TrainConfig(
            model=self.model, init_from=self.init_from, data=DataConfig(seq_len=self.task.seq_len),
            optim=self.optim, train=dataclasses.replace(self.train, trainable="all" if arm == "base" else
                                                        self.train.trainable),
            mesh=self.mesh, checkpoint=self.checkpoint, distributed=self.distributed,
            output_dir=str(pathlib.Path(self.output_dir) / arm), seed=self.seed,
            attention_gate=self.attention_gate if arm == "gated" else None,
        )


@dataclasses.dataclass
class SFTResult:
    run_dir: str
    arms: dict  # {arm: {"accuracy", "eviction_ratio" (gated), "per_label_accuracy", "trained", "steps", ...}}
    wall_time_s: float


# ---- loss and steps -------------------------------------------------------------------------------------------------


def answer_loss(model: DecoderLM, params: dict, batch: dict, max_label_len: int, answer_ids,
                rng: Optional[jax.Array] = None):
    """``(loss, metrics)``: the mean over examples of the answer's NLL (summed over its tokens), plus the methods'
    auxiliary losses (Attention-Gate's eviction loss). Logits are computed only at the ``max_label_len`` positions from
    ``answer_pos`` (the LM head over the whole sequence would dominate the cost for a large vocabulary).

    batch: ``tokens [B, T + 1]``, ``valid [B, T]``, ``answer_pos [B]``, ``label_len [B]``, ``label [B]``
    (``jaxeff.data.tasks.BookClassification.train_batch``). ``metrics``: ``nll``, ``accuracy`` (first answer token,
    restricted to the labels), and the methods' metrics (``gate_keep``, ``evict_loss``).
    """
    tokens = batch["tokens"]
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    out = model.forward(params, inputs, attention_mask=batch["valid"], rng=rng, return_hidden=True,
                        compute_logits=False)
    t = inputs.shape[1]
    idx = jnp.clip(batch["answer_pos"][:, None] + jnp.arange(max_label_len)[None, :], 0, t - 1)  # [B, L]
    hidden = jnp.take_along_axis(out.hidden, idx[..., None], axis=1)  # [B, L, d]
    logits = model.logits(params, hidden).astype(jnp.float32)  # [B, L, V]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.take_along_axis(targets, idx, axis=1))
    in_label = jnp.arange(max_label_len)[None, :] < batch["label_len"][:, None]
    # the answer's NLL summed over its tokens: every example's decision (first) token has weight 1 whatever the
    # label's length (a per-token mean would give a 4-token label's decision a quarter of the weight)
    task_loss = jnp.mean(jnp.sum(jnp.where(in_label, nll, 0.0), axis=-1))
    pred = jnp.argmax(logits[:, 0, :][:, jnp.asarray(answer_ids)], axis=-1)
    accuracy = jnp.mean((pred == batch["label"]).astype(jnp.float32))
    extra, metrics = method_losses(model, out.aux)
    return task_loss + extra, {"nll": task_loss, "accuracy": accuracy, **metrics}


def make_sft_step(model: DecoderLM, tx: optax.GradientTransformation, max_label_len: int, answer_ids,
                  grad_accum: int = 1, trainable: str = "all"):
    """The pure train step ``(state, batch) -> (state, metrics)`` for :func:`answer_loss`; the state is the LM
    trainer's (``jaxeff.training.steps``). ``grad_accum > 1`` splits the batch into strided micro-batches whose
    gradients are averaged in a ``lax.scan`` (every example has the same weight, so this equals the whole batch).
    A step with a non-finite gradient leaves the state as it was (but the step count) and reports
    ``skipped = 1``."""

    def loss_and_grad(params, batch, rng):
        mask = trainable_mask(params, trainable)

        def loss(p):
            p = jax.tree.map(lambda x, train: x if train else jax.lax.stop_gradient(x), p, mask)
            return answer_loss(model, p, batch, max_label_len, answer_ids, rng)

        (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return {"loss": value, **metrics}, grads

    def step(state, batch):
        params = state["params"]
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        if grad_accum == 1:
            metrics, grads = loss_and_grad(params, batch, rng)
        else:
            micro = jax.tree.map(
                lambda x: x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1), batch)

            def body(carry, xs):
                mb, a = xs
                m, g = loss_and_grad(params, mb, jax.random.fold_in(rng, a))
                return jax.tree.map(lambda acc, x: acc + x.astype(jnp.float32), carry, (m, g)), None

            zero = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32),
                                jax.eval_shape(lambda: loss_and_grad(params, jax.tree.map(lambda x: x[0], micro),
                                                                     rng)))
            (msum, gsum), _ = jax.lax.scan(body, zero, (micro, jnp.arange(grad_accum)))
            metrics = jax.tree.map(lambda x: x / grad_accum, msum)
            grads = jax.tree.map(lambda g, p: (g / grad_accum).astype(p.dtype), gsum, params)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        # A step whose gradient is not finite is skipped (parameters and optimizer state unchanged) and counted:
        # the gates' straight-through gradient can overflow (see docs/kv_eviction.md), and one inf would turn
        # every parameter into NaN.
        finite = jnp.isfinite(grad_norm)
        keep_old = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = {"params": keep_old(new_params, params), "opt_state": keep_old(opt_state, state["opt_state"]),
                     "step": state["step"] + 1, "rng": state["rng"]}
        return new_state, {**metrics, "grad_norm": grad_norm, "skipped": 1.0 - finite.astype(jnp.float32)}

    return step


def make_eval_step(model: DecoderLM, answer_ids):
    """``(params, batch) -> (label logits [B, K], keep rate)``: one forward over the prompts (``tokens [B, T]``,
    ``valid [B, T]``), logits only at ``answer_pos`` restricted to the labels' first tokens, and the gate's keep rate
    over the batch's valid (token, KV head) pairs averaged over layers (1 without gates)."""
    answer_ids = jnp.asarray(answer_ids)

    def step(params, batch):
        out = model.forward(params, batch["tokens"], attention_mask=batch["valid"], logits_at=batch["answer_pos"])
        keep = jnp.mean(out.aux["gate_keep"]) if "gate_keep" in out.aux else jnp.ones((), jnp.float32)
        return out.logits[:, 0, :][:, answer_ids], keep

    return step


def _batch_shardings(mesh, arrays: dict) -> dict:
    return {k: shd.data_sharding(mesh, v.ndim, shape=v.shape) for k, v in arrays.items()}


def _abstract(arrays: dict, shardings: dict) -> dict:
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in arrays.items()}


def _put(batch: dict, mesh) -> dict:
    return {k: shd.shard_host_batch(np.asarray(v), mesh) for k, v in batch.items()}


_EVAL_KEYS = ("tokens", "valid", "answer_pos")


def evaluate_task(eval_step, params, test: dict, batch_size: int, mesh, num_labels: int,
                  max_batches: Optional[int] = None) -> dict:
    """Accuracy (over the real test rows), per-label accuracy, and the keep rate / eviction ratio weighted by each
    batch's valid prompt tokens (so it is the share of all prompt KV entries, not a mean of batch means)."""
    rows = len(test["tokens"])
    if max_batches is not None:
        rows = min(rows, max_batches * batch_size)
    preds, kept, tokens = [], 0.0, 0.0
    outs = []
    for i in range(0, rows, batch_size):
        batch = {k: test[k][i:i + batch_size] for k in _EVAL_KEYS}
        outs.append((eval_step(params, _put(batch, mesh)), float(batch["valid"].sum())))
    for (logits, keep), n in outs:
        preds.append(np.argmax(np.asarray(jax.device_get(logits)), axis=-1))
        kept += float(keep) * n
        tokens += n
    pred = np.concatenate(preds)[:rows]
    label, weight = test["label"][:rows], test["weight"][:rows]
    correct = (pred == label) * weight
    per_label = [float(correct[label == k].sum() / max(weight[label == k].sum(), 1.0)) for k in range(num_labels)]
    keep = kept / max(tokens, 1.0)
    return {"accuracy": float(correct.sum() / weight.sum()), "per_label_accuracy": per_label,
            "gate_keep": keep, "eviction_ratio": 1.0 - keep, "test_passages": int(weight.sum()),
            "prompt_tokens": int(tokens)}


# ---- the run --------------------------------------------------------------------------------------------------------


def resolve_gates_dir(gates_from: str) -> pathlib.Path:
    """The directory holding saved gates: ``gates_from`` itself or its ``gates/`` (a CPT run directory)."""
    path = pathlib.Path(gates_from).expanduser()
    for d in (path, path / "gates"):
        if (d / GATES_FILE).is_file():
            return d
    raise ConfigError(
        f"config field 'gates_from': expected a directory written by save_gates ({GATES_FILE}) or a CPT run "
        f"directory holding gates/, got {gates_from!r}{missing_run_hint(gates_from)}"
    )


def missing_run_hint(path: str) -> str:
    """``"; create it first with: python -m train.<job> --config configs/<name>.yaml"`` when ``path`` (or a parent)
    is named after a bundled config (``runs/lm_tiny`` -> ``configs/lm_tiny.yaml``), else ``""``."""
    for part in reversed(pathlib.Path(path).parts):
        config = pathlib.Path("configs") / f"{part}.yaml"
        if config.is_file():
            job = "train.attention_gate" if "attention_gate" in config.read_text() else "train.lm"
            return f"; it does not exist yet: create it first with `python -m {job} --config {config}`"
    return " (it does not exist)" if not pathlib.Path(path).exists() else ""


def check_init_from(init_from: str) -> None:
    """A clear error (with the command that creates it) when ``init_from`` is a missing run directory."""
    if init_from == "smollm2":
        return
    path = pathlib.Path(init_from).expanduser()
    if not ((path / "config.json").is_file() or (path / "model.yaml").is_file()):
        raise ConfigError(
            f"config field 'init_from': expected 'smollm2', a Hugging Face model directory (config.json) or a "
            f"training run directory (model.yaml), got {init_from!r}{missing_run_hint(init_from)}"
        )
    if (path / "model.yaml").is_file() and ckpt.latest_step(path) is None:
        raise ConfigError(f"config field 'init_from': expected a training run with a finalised checkpoint, got "
                          f"{init_from!r} (no checkpoint in {ckpt.checkpoint_dir(path)}; is it still running?)")


def _prepare(cfg: SFTConfig, run_dir: pathlib.Path, resume: bool, overwrite: bool, is_main: bool) -> None:
    arm_dirs = [run_dir / arm for arm in cfg.arms]
    has_ckpt = any(ckpt.checkpoint_dir(d).exists() and any(ckpt.checkpoint_dir(d).iterdir()) for d in arm_dirs)
    if has_ckpt and not resume and not overwrite:
        raise ConfigError(
            f"config field 'output_dir': expected a directory without checkpoints for a new run, got {str(run_dir)!r} "
            f"which has some; pass --resume to continue it, --overwrite to start over, or set output_dir=..."
        )
    if is_main:
        if overwrite and not resume:
            for d in arm_dirs:
                for sub in (ckpt.checkpoint_dir(d), d / TB_DIR, d / "gates"):
                    shutil.rmtree(sub, ignore_errors=True)
            (run_dir / RESULTS_FILE).unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)


def _say(msg: str, is_main: bool) -> None:
    if is_main:
        tqdm.write(msg, file=sys.stderr)


def _describe(m: dict, gated: bool) -> str:
    out = f"accuracy {m['accuracy']:.1%}"
    if gated:
        out += f", eviction ratio {m['eviction_ratio']:.1%}"
    return out


def _run_arm(cfg: SFTConfig, arm: str, mesh, resume: bool, is_main: bool) -> dict:
    tcfg = cfg.arm_config(arm)
    run_dir = pathlib.Path(tcfg.output_dir).absolute()
    loop = cfg.train
    trains = cfg.trains(arm)
    gated = arm == "gated"
    restored_step = ckpt.latest_step(run_dir) if (resume and trains) else None
    model, params0, tokenizer = build_model_and_tokenizer(tcfg, mesh, load_weights=restored_step is None)
    if gated and cfg.gates_from is not None and params0 is not None:
        params0 = with_saved_gates(cfg, model, params0)
    data = BookClassification(cfg.task, tokenizer, cfg.seed)
    eval_bs = loop.eval_bs
    test = data.test_arrays(multiple_of=eval_bs)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(tcfg), sort_keys=False))
        (run_dir / "model.yaml").write_text(yaml.safe_dump(to_dict(model.config), sort_keys=False))
        tokenizer.save_pretrained(str(run_dir))
        (run_dir.parent / "task.json").write_text(json.dumps(data.summary(), indent=2) + "\n")

    tx = make_optimizer(cfg.optim, loop.steps, tcfg.train.trainable, params=jax.eval_shape(model.init,
                                                                                         jax.random.key(0)))
    shardings = state_shardings(model, tx, mesh)
    test_sh = _batch_shardings(mesh, {k: test[k][:eval_bs] for k in _EVAL_KEYS})

    def traced_eval(params, batch):
        with shd.activate(mesh):
            return make_eval_step(model, data.answer_ids)(params, batch)

    eval_step = jax.jit(traced_eval, in_shardings=(shardings["params"], test_sh), out_shardings=replicated(mesh))

    def evaluate(params) -> dict:
        return evaluate_task(eval_step, params, test, eval_bs, mesh, data.num_labels, loop.eval_batches)

    if not trains:  # the frozen base model, as it is
        params = jax.device_put(params0, shardings["params"])
        result = {**evaluate(params), "trained": False, "steps": 0}
        _say(f"[sft:{arm}] frozen base model (train.trainable=methods): {_describe(result, gated)}", is_main)
        return result

    manager = ckpt.open_manager(run_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save) \
        if cfg.checkpoint.enabled or resume else None
    if restored_step is not None:
        params, opt_state, meta = ckpt.restore(manager, abstract_state(model, tx), shardings, restored_step)
        position = data.check_position(meta["data"])
        state = {"params": params, "opt_state": opt_state,
                 "step": jax.device_put(np.int32(meta["step"]), shardings["step"]),
                 "rng": jax.device_put(np.asarray(meta["rng"], np.uint32), shardings["rng"])}
        start_step = int(meta["step"])
    else:
        state = init_state(model, tx, jax.random.key(cfg.seed), shardings, params=params0)
        position, start_step = 0, 0
    del params0
    rng_data = [int(x) for x in np.asarray(jax.device_get(state["rng"])).reshape(-1)]
    logger = MetricsLogger(run_dir, enabled=is_main, resume_step=restored_step)

    example = data.train_batch(0, loop.batch_size)
    batch_sh = _batch_shardings(mesh, example)
    step_fn = make_sft_step(model, tx, data.max_label_len, data.answer_ids, loop.grad_accum, tcfg.train.trainable)

    def traced_step(state, batch):
        with shd.activate(mesh):
            return step_fn(state, batch)

    t_compile = time.time()  # compiled ahead of the loop so that the throughput excludes compilation
    train_step = jax.jit(traced_step, in_shardings=(shardings, batch_sh), out_shardings=(shardings, replicated(mesh)),
                         donate_argnums=(0,)).lower(state, _abstract(example, batch_sh)).compile()
    compile_s = time.time() - t_compile
    schedule = lr_schedule(cfg.optim, loop.steps)
    n_test = len(data.test_passages) if loop.eval_batches is None else min(len(data.test_passages),
                                                                           loop.eval_batches * eval_bs)
    _say(f"[sft:{arm}] {model.config.num_params() / 1e6:.2f}M base params, trainable: {tcfg.train.trainable}; "
         f"evaluating on {n_test} of {len(data.test_passages)} test passages (balanced over "
         f"{data.num_labels} labels); train step compiled in {compile_s:.1f} s", is_main)
    if restored_step is not None:
        _say(f"[sft:{arm}] resumed from checkpoint step {restored_step}", is_main)
    if loop.eval_at_start and restored_step is None:
        m = evaluate(state["params"])
        logger.log("eval", 0, {k: v for k, v in m.items() if not isinstance(v, list)})
        _say(f"[sft:{arm}] step 0: {_describe(m, gated)}", is_main)

    bar = tqdm(total=loop.steps, initial=start_step, disable=not (is_main and loop.progress), desc=f"sft:{arm}",
               dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
    steps = StepMetrics(logger, bar, schedule=schedule, units_per_step=loop.batch_size,
                        postfix=lambda v, r: dict(loss=f"{v['loss']:.3f}", acc=f"{v['accuracy']:.2f}"))
    last_eval: Optional[dict] = None
    for step in range(start_step + 1, loop.steps + 1):
        batch = data.train_batch(position, loop.batch_size)
        position += loop.batch_size
        state, metrics = train_step(state, _put(batch, mesh))
        steps.add(step, metrics)
        last = step == loop.steps
        do_eval = (loop.eval_every and step % loop.eval_every == 0) or last
        do_save = manager is not None and cfg.checkpoint.enabled and (
            (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or last)
        if step % loop.log_every == 0 or do_eval or do_save:
            steps.flush()
            if do_eval:
                last_eval = evaluate(state["params"])
                logger.log("eval", step, {k: v for k, v in last_eval.items() if not isinstance(v, list)})
                logger.flush()
                _say(f"[sft:{arm}] step {step}: {_describe(last_eval, gated)}", is_main)
            if do_save:
                ckpt.save(manager, state, {"step": step, "data": data.data_state(position), "rng": rng_data})
            steps.restart_clock()
    bar.close()
    if manager is not None:
        manager.wait_until_finished()
        manager.close()
    if last_eval is None:  # resumed at the final step: evaluate what was restored
        last_eval = evaluate(state["params"])
    logger.flush()
    skipped = int(sum(r.get("skipped", 0.0) for r in read_metrics(run_dir, "train"))) if is_main else 0
    if skipped:
        _say(f"[sft:{arm}] warning: {skipped} step(s) had a non-finite gradient and were skipped", is_main)
    result = {**last_eval, "trained": True, "steps": loop.steps, "skipped_steps": skipped,
              "train_examples_per_s": steps.rate() if steps.train_time > 0 else None}
    if gated and is_main:
        save_gates(run_dir / "gates", cfg.attention_gate, jax.device_get(state["params"]))
    logger.log("final", loop.steps, {k: v for k, v in result.items() if isinstance(v, (int, float))}, tb=False)
    logger.close()
    return result


def train_sft(cfg: SFTConfig, *, resume: bool = False, overwrite: bool = False) -> SFTResult:
    """Runs the arms of ``cfg`` one after the other (each resumable) and writes ``results.json``."""
    t0 = time.time()
    check_init_from(cfg.init_from)
    if cfg.gates_from is not None:
        resolve_gates_dir(cfg.gates_from)
    initialize_distributed(cfg.arm_config("gated"))
    is_main = jax.process_index() == 0
    for arm in cfg.arms:
        cfg.arm_config(arm).validate(jax.device_count())
    mesh = shd.make_mesh(cfg.mesh)
    run_dir = pathlib.Path(cfg.output_dir).absolute()
    _prepare(cfg, run_dir, resume, overwrite, is_main)
    if is_main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump({"job": "sft", **to_dict(cfg)}, sort_keys=False))
    arms = {arm: _run_arm(cfg, arm, mesh, resume, is_main) for arm in cfg.arms}
    wall = time.time() - t0
    if is_main:
        summary = {"arms": arms, "wall_time_s": wall, "chance": 1.0 / len(cfg.task.books)}
        (run_dir / RESULTS_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        line = f"[sft] done in {wall:.1f} s: with Attention-Gate {_describe(arms['gated'], True)}"
        if "base" in arms:
            line += f"; without gates accuracy {arms['base']['accuracy']:.1%}"
        _say(line + f" (chance {1.0 / len(cfg.task.books):.1%})", is_main)
    return SFTResult(run_dir=str(run_dir), arms=arms, wall_time_s=wall)


__all__ = ["SFTConfig", "SFTResult", "answer_loss", "check_init_from", "evaluate_task", "make_eval_step",
           "make_sft_step", "resolve_gates_dir", "train_sft"]
