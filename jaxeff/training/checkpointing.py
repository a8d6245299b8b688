"""Orbax checkpoints of a training run.

One checkpoint step holds three items: ``params`` and ``opt_state`` (``StandardSave``: sharded arrays, written by
every process for its own shards) and ``meta`` (``JsonSave``: optimizer step, data position, RNG key data, so a
resumed run continues exactly). Keeping ``params`` a separate item lets inference restore it alone.

Saves are asynchronous and atomic: Orbax writes into ``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>``
only once every process has finished, so a run killed mid-save leaves the earlier steps intact and the half-written
directory is ignored by ``latest_step`` (and removed when the manager is opened again). Restores always pass an
abstract target carrying shardings: restoring on a different topology without one fails.
"""

from __future__ import annotations

import pathlib
from typing import Optional

import orbax.checkpoint as ocp

from jaxeff.training.steps import with_shardings


def checkpoint_dir(run_dir: str | pathlib.Path) -> pathlib.Path:
    return pathlib.Path(run_dir).absolute() / "checkpoints"


def open_manager(run_dir, *, keep: int = 2, async_save: bool = True, read_only: bool = False):
    """An Orbax ``CheckpointManager`` over ``<run_dir>/checkpoints``. The trainer decides when to save, so the
    manager's own interval is 1 (every ``save`` call is honoured)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep,
        save_interval_steps=0 if read_only else 1,
        enable_async_checkpointing=async_save and not read_only,
        cleanup_tmp_directories=not read_only,
        read_only=read_only,
        create=not read_only,
    )
    return ocp.CheckpointManager(checkpoint_dir(run_dir), options=options)


def save(manager, state: dict, meta: dict, *, force: bool = True) -> bool:
    """Starts saving ``state`` (params + opt_state) and ``meta`` (JSON) at ``meta["step"]``; returns at once when
    asynchronous. ``meta`` must hold a JSON-serialisable ``step``."""
    step = int(meta["step"])
    return manager.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            opt_state=ocp.args.StandardSave(state["opt_state"]),
            meta=ocp.args.JsonSave(meta),
        ),
        force=force,
    )


def restore(manager, abstract_state: dict, shardings: dict, step: Optional[int] = None):
    """``(params, opt_state, meta)`` of ``step`` (default: the latest finalised one), placed in ``shardings``.

    ``abstract_state`` / ``shardings``: pytrees with ``"params"`` and ``"opt_state"`` entries (``ShapeDtypeStruct``s
    and ``NamedSharding``s)."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no finalised checkpoint in {manager.directory}")
    target = with_shardings(
        {"params": abstract_state["params"], "opt_state": abstract_state["opt_state"]},
        {"params": shardings["params"], "opt_state": shardings["opt_state"]},
    )
    out = manager.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target["params"]),
            opt_state=ocp.args.StandardRestore(target["opt_state"]),
            meta=ocp.args.JsonRestore(),
        ),
    )
    return out["params"], out["opt_state"], dict(out["meta"])


def restore_params(run_dir, abstract_params, param_shardings, step: Optional[int] = None):
    """``(params, step)``: only the parameters of a run's checkpoint (no optimizer state is read)."""
    with open_manager(run_dir, read_only=True) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no finalised checkpoint in {checkpoint_dir(run_dir)}")
        if step not in manager.all_steps():
            raise FileNotFoundError(
                f"step {step} is not a checkpoint of {run_dir}; available: {list(manager.all_steps())}"
            )
        out = manager.restore(
            step,
            args=ocp.args.Composite(params=ocp.args.StandardRestore(with_shardings(abstract_params,
                                                                                  param_shardings))),
        )
    return out["params"], step


def latest_step(run_dir) -> Optional[int]:
    d = checkpoint_dir(run_dir)
    if not d.exists():
        return None
    with open_manager(run_dir, read_only=True) as manager:
        return manager.latest_step()

