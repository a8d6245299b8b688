"""Orbax checkpoints of a training run.

One checkpoint step holds three items: ``params`` and ``opt_state`` (``StandardSave``: sharded arrays, written by
every process for its own shards) and ``meta`` (``JsonSave``: optimizer step, data position, RNG key data, so a
resumed run continues exactly). Keeping ``params`` a separate item lets inference restore it alone.

Saves are asynchronous and atomic: Orbax writes into ``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>``
only once every process has finished, so a run killed mid-save leaves the earlier steps intact and the half-written
directory is ignored by ``latest_step`` (and removed when the manager is opened again). Restores always pass an
abstract target carrying shardings: restoring on a different topology without one fails. Before restoring, the
stored parameters' shapes are compared with the target's, so a checkpoint of another model fails with an error that
names the parameters that differ.

In a single process, arrays are written without Orbax's replica-parallel slicing (see ``_single_process_arrays``).
"""

from __future__ import annotations

import logging
import pathlib
from typing import Optional

import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxeff.training.steps import with_shardings


def checkpoint_dir(run_dir: str | pathlib.Path) -> pathlib.Path:
    return pathlib.Path(run_dir).absolute() / "checkpoints"


_ARRAY_HANDLER_SET = False


def _single_process_arrays() -> None:
    """In a single process, registers Orbax's ``jax.Array`` handler with replica-parallel saving turned off.

    Replica-parallel saving splits every replicated array into one slice per replica so that several hosts share
    the writing; each slice is a separate device computation, compiled per distinct shape. With one process every
    slice lands on the same host anyway, and on the CPU (8 simulated devices, data-parallel) the slicing made a
    tiny model's save take about 10 s instead of well under one. Several processes keep Orbax's default. The
    registration is process-wide (Orbax's type-handler registry is global) and happens once, at the first
    ``open_manager`` (after ``jax.distributed.initialize``, which must come first anyway)."""
    global _ARRAY_HANDLER_SET
    if _ARRAY_HANDLER_SET or jax.process_count() != 1:
        return
    absl = logging.getLogger("absl")  # Orbax warns on every override of a registered type
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
    finally:
        absl.setLevel(level)
    _ARRAY_HANDLER_SET = True


def open_manager(run_dir, *, keep: int = 2, async_save: bool = True, read_only: bool = False):
    """An Orbax ``CheckpointManager`` over ``<run_dir>/checkpoints``. The trainer decides when to save, so the
    manager's own interval is 1 (every ``save`` call is honoured)."""
    _single_process_arrays()
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


def _stored_shapes(manager, step: int, item: str) -> Optional[dict]:
    """``{path: shape}`` of the arrays of ``item`` at ``step`` as written, or None when the checkpoint's metadata
    cannot be read (the restore then reports any mismatch itself)."""
    path = pathlib.Path(str(manager.directory)) / str(step) / item
    if not path.is_dir():
        return None
    handler = ocp.StandardCheckpointHandler()
    try:
        md = handler.metadata(epath.Path(path))
        tree = getattr(md, "tree", md)
        return {jax.tree_util.keystr(k): tuple(v.shape)
                for k, v in jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))}
    except Exception:  # noqa: BLE001 (the metadata only improves the error message; the restore still checks)
        return None
    finally:
        handler.close()


def check_stored_params(manager, step: int, abstract_params) -> None:
    """Raises ``ValueError`` naming the parameters of ``step`` whose stored shapes differ from ``abstract_params``,
    or that only one of the two has (up to five of each)."""
    stored = _stored_shapes(manager, step, "params")
    if stored is None:
        return
    want = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(abstract_params)}
    if not want.keys() & stored.keys():
        return  # the metadata names the leaves another way: leave the comparison to the restore
    problems = [f"{k}: stored {stored[k]}, expected {want[k]}" for k in sorted(want.keys() & stored.keys())
                if stored[k] != want[k]][:5]
    problems += [f"{k}: missing from the checkpoint" for k in sorted(want.keys() - stored.keys())][:5]
    problems += [f"{k}: in the checkpoint but not in the model" for k in sorted(stored.keys() - want.keys())][:5]
    if problems:
        raise ValueError(f"the parameters of checkpoint step {step} in {manager.directory} do not match the model: "
                         + "; ".join(problems))


def restore(manager, abstract_state: dict, shardings: dict, step: Optional[int] = None):
    """``(params, opt_state, meta)`` of ``step`` (default: the latest finalised one), placed in ``shardings``.

    ``abstract_state`` / ``shardings``: pytrees with ``"params"`` and ``"opt_state"`` entries (``ShapeDtypeStruct``s
    and ``NamedSharding``s)."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no finalised checkpoint in {manager.directory}")
    check_stored_params(manager, step, abstract_state["params"])
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
    """``(params, step)``: only the parameters of a run's checkpoint (no optimizer state is read).

    Raises ``FileNotFoundError`` (no checkpoint, or not ``step``) or ``ValueError`` (parameters of another shape)."""
    with open_manager(run_dir, read_only=True) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no finalised checkpoint in {checkpoint_dir(run_dir)}")
        if step not in manager.all_steps():
            raise FileNotFoundError(
                f"step {step} is not a checkpoint of {run_dir}; available: {list(manager.all_steps())}"
            )
        check_stored_params(manager, step, abstract_params)
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

