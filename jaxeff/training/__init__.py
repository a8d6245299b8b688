"""Training: typed run config, optimizer, loss, sharded train/eval steps, Orbax checkpoints, metrics, the loop.

    from jaxeff.config import load_config
    from jaxeff.training import TrainConfig, train, load_run
    result = train(load_config(TrainConfig, "configs/lm_tiny.yaml", ["train.steps=50"]))
    model, params, tokenizer = load_run(result.run_dir)
"""

from jaxeff.training.config import (
    CheckpointConfig,
    DataConfig,
    DistributedConfig,
    LoopConfig,
    OptimConfig,
    TrainConfig,
)
from jaxeff.training.loss import next_token_loss, nll_sum, token_nll
from jaxeff.training.metrics import MetricsLogger, read_metrics
from jaxeff.training.optim import lr_schedule, make_optimizer
from jaxeff.training.run import load_run
from jaxeff.training.steps import (
    abstract_state,
    init_state,
    jit_eval_step,
    jit_train_step,
    make_train_step,
    state_shardings,
)
from jaxeff.training.tensorboard import EventWriter, crc32c, read_events
from jaxeff.training.trainer import TrainResult, train

__all__ = [
    "TrainConfig", "DataConfig", "OptimConfig", "LoopConfig", "CheckpointConfig", "DistributedConfig",
    "next_token_loss", "nll_sum", "token_nll", "MetricsLogger", "read_metrics", "lr_schedule", "make_optimizer",
    "load_run", "abstract_state", "init_state", "jit_eval_step", "jit_train_step", "make_train_step",
    "state_shardings", "EventWriter", "crc32c", "read_events", "TrainResult", "train",
]
