"""Hugging Face checkpoints: lazy safetensors import (optionally straight into a sharded layout) and export.

    model, params = load_pretrained("path/to/hf_dir")                       # Llama, Mistral, Qwen2, Mixtral, SmolLM2
    model, params = load_pretrained(d, mesh=mesh, param_dtype="bfloat16")    # each device reads only its shard
    save_pretrained(model, params, "out_dir", max_shard_size="2GB")          # transformers can load "out_dir"

Names and layouts (one table, :func:`hf_tensor_map`; our layout is in ``jaxeff.models.lm``). Torch ``nn.Linear``
stores ``[out, in]``; we store ``[in, out]`` with heads split and layers stacked on axis 0::

    model.embed_tokens.weight [V, d]                      -> embed/embedding [V, d]
    model.layers.{i}.self_attn.{q,k,v}_proj.weight [H*D, d] -> layers/attn/{q,k,v}/kernel [L, d, H, D]
    model.layers.{i}.self_attn.o_proj.weight [d, H*D]       -> layers/attn/o/kernel [L, H, D, d]
    model.layers.{i}.mlp.{gate,up,down}_proj.weight         -> layers/mlp/{gate,up,down}/kernel (transposed)
    model.layers.{i}.block_sparse_moe.gate.weight [E, d]    -> layers/moe/router/kernel [L, d, E]
    model.layers.{i}.block_sparse_moe.experts.{j}.w1|w3|w2  -> layers/moe/gate|up|down/kernel [L, E, ...]
    lm_head.weight [V, d]                                   -> lm_head/kernel [d, V]  (absent when tied)

Mixtral: transformers 5 holds the experts fused in memory but ``save_pretrained`` writes the per-expert Hub names
above (w1 gate, w3 up, w2 down); that on-disk layout is what is read and written here.

Loading is lazy: ``safe_open(..., framework="np")`` memory-maps every file and ``get_slice`` reads only the rows
and columns a device's shard needs, so a model larger than one device (or than host memory, per leaf) loads
straight into its ``NamedSharding``. bf16/f16 tensors come back as ``ml_dtypes`` arrays and are cast to the
parameter dtype exactly. Files are checked before any tensor is read: missing or unexpected names, shapes and
dtypes all raise :class:`CheckpointError` naming the tensor and file. Two kinds of extra tensor are ignored:
``rotary_emb.inv_freq`` buffers (recomputed from the config) and ``lm_head.weight`` in a tied checkpoint (some
exporters write the tied copy; transformers ignores it as well). Only headers and sizes are checked: safetensors
has no checksums, so flipped bytes inside a tensor's data cannot be detected.

Export gathers the parameters to the host (single process) and writes the parameter dtype as is. Method
parameters (``params["methods"]``) have no place in the Hugging Face layout and are not written.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import json
import os
import pathlib
import re
from typing import Any, Iterable, Mapping, Optional

import jax
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxeff import sharding as shd
from jaxeff.checkpoint.hf_config import (
    CheckpointError,
    config_from_hf,
    config_to_hf,
    read_hf_config_dict,
)
from jaxeff.models.config import LMConfig
from jaxeff.models.lm import DecoderLM, ParamSpec, param_specs

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")

# Names some checkpoints carry that hold nothing the model needs (recomputed RoPE tables).
HARMLESS_EXTRA = (re.compile(r"(^|\.)rotary_emb\.inv_freq$"),)

_FILE_DTYPES = ("F64", "F32", "F16", "BF16")


# ---- the name table ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """How one Hugging Face tensor maps onto one of our (stacked) parameters.

    path: our parameter path (``("layers", "attn", "q", "kernel")``); index: its position along the stacked leading
    axes (``(layer,)``, ``(layer, expert)`` or ``()``); kind: the layout change, one of
      ``copy``        same shape;
      ``transpose``   ours ``[a, b]`` = theirs ``[b, a]`` (torch Linear);
      ``heads_in``    ours ``[d, H, D]``  <- theirs ``[H*D, d]`` (q/k/v projections);
      ``heads_bias``  ours ``[H, D]``     <- theirs ``[H*D]``;
      ``heads_out``   ours ``[H, D, d]``  <- theirs ``[d, H*D]`` (output projection).
    """

    hf_name: str
    path: tuple
    index: tuple
    kind: str


def hf_tensor_map(cfg: LMConfig) -> dict[str, TensorMap]:
    """Every Hugging Face tensor name of ``cfg``'s checkpoint, in file order, and where it goes."""
    out: dict[str, TensorMap] = {}

    def add(name, path, kind, index=()):
        out[name] = TensorMap(name, tuple(path.split("/")), tuple(index), kind)

    add("model.embed_tokens.weight", "embed/embedding", "copy")
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        add(p + "input_layernorm.weight", "layers/attn_norm/scale", "copy", (i,))
        for n in "qkv":
            add(p + f"self_attn.{n}_proj.weight", f"layers/attn/{n}/kernel", "heads_in", (i,))
            if cfg.qkv_bias:
                add(p + f"self_attn.{n}_proj.bias", f"layers/attn/{n}/bias", "heads_bias", (i,))
        add(p + "self_attn.o_proj.weight", "layers/attn/o/kernel", "heads_out", (i,))
        if cfg.o_bias:
            add(p + "self_attn.o_proj.bias", "layers/attn/o/bias", "copy", (i,))
        add(p + "post_attention_layernorm.weight", "layers/mlp_norm/scale", "copy", (i,))
        if cfg.is_moe:
            add(p + "block_sparse_moe.gate.weight", "layers/moe/router/kernel", "transpose", (i,))
            for j in range(cfg.num_experts):
                q = p + f"block_sparse_moe.experts.{j}."
                add(q + "w1.weight", "layers/moe/gate/kernel", "transpose", (i, j))
                add(q + "w2.weight", "layers/moe/down/kernel", "transpose", (i, j))
                add(q + "w3.weight", "layers/moe/up/kernel", "transpose", (i, j))
        else:
            for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                add(p + f"mlp.{theirs}.weight", f"layers/mlp/{ours}/kernel", "transpose", (i,))
                if cfg.mlp_bias:
                    add(p + f"mlp.{theirs}.bias", f"layers/mlp/{ours}/bias", "copy", (i,))
    add("model.norm.weight", "final_norm/scale", "copy")
    if not cfg.tie_embeddings:
        add("lm_head.weight", "lm_head/kernel", "transpose")
    return out


def _hf_shape(kind: str, inner: tuple) -> tuple:
    """The on-disk shape of a tensor whose slice of our parameter has shape ``inner``."""
    if kind == "copy":
        return tuple(inner)
    if kind == "transpose":
        return tuple(reversed(inner))
    if kind == "heads_in":
        d, h, k = inner
        return (h * k, d)
    if kind == "heads_bias":
        h, k = inner
        return (h * k,)
    if kind == "heads_out":
        h, k, d = inner
        return (d, h * k)
    raise AssertionError(kind)


def _read_block(src, kind: str, inner: tuple, idx: list) -> np.ndarray:
    """Reads the part ``idx`` (``[(start, stop)]`` per inner axis) of our parameter from the lazy slice ``src``,
    touching only the rows/columns it needs."""
    if kind == "copy":
        return src[tuple(slice(a, b) for a, b in idx)]
    if kind == "transpose":
        (a0, b0), (a1, b1) = idx
        return src[a1:b1, a0:b0].T
    if kind == "heads_in":
        (d0, d1), (h0, h1), (k0, k1) = idx
        hd = inner[2]
        x = src[h0 * hd : h1 * hd, d0:d1].reshape(h1 - h0, hd, d1 - d0)[:, k0:k1, :]
        return x.transpose(2, 0, 1)
    if kind == "heads_bias":
        (h0, h1), (k0, k1) = idx
        hd = inner[1]
        return src[h0 * hd : h1 * hd].reshape(h1 - h0, hd)[:, k0:k1]
    if kind == "heads_out":
        (h0, h1), (k0, k1), (d0, d1) = idx
        hd = inner[1]
        x = src[d0:d1, h0 * hd : h1 * hd].reshape(d1 - d0, h1 - h0, hd)[:, :, k0:k1]
        return x.transpose(1, 2, 0)
    raise AssertionError(kind)


def _to_hf(kind: str, block: np.ndarray) -> np.ndarray:
    """The inverse of :func:`_read_block` on a whole block: our layout -> the on-disk layout."""
    if kind == "copy":
        out = block
    elif kind == "transpose":
        out = block.T
    elif kind == "heads_in":
        out = block.transpose(1, 2, 0).reshape(-1, block.shape[0])
    elif kind == "heads_bias":
        out = block.reshape(-1)
    elif kind == "heads_out":
        out = block.reshape(-1, block.shape[-1]).T
    else:
        raise AssertionError(kind)
    return np.ascontiguousarray(out)


# ---- reading ----------------------------------------------------------------------------------------------------


class _Sources:
    """The safetensors files of one checkpoint, opened lazily (memory-mapped) and closed together."""

    def __init__(self, directory: pathlib.Path, stack: contextlib.ExitStack):
        self.directory = directory
        self.key_file: dict[str, str] = {}
        self._handles: dict[str, Any] = {}
        index = directory / INDEX_FILE
        single = directory / SINGLE_FILE
        if index.is_file():
            weight_map = _read_index(index)
            files = sorted(set(weight_map.values()))
            absent = [f for f in files if not (directory / f).is_file()]
            if absent:
                raise CheckpointError(
                    f"{str(index)!r} lists shard file(s) that do not exist in {str(directory)!r}: {absent}"
                )
        elif single.is_file():
            weight_map, files = None, [SINGLE_FILE]
        else:
            found = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
            hint = f" (found {found}: only safetensors is supported)" if found else ""
            raise CheckpointError(f"{str(directory)!r} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")
        for f in files:
            try:
                handle = stack.enter_context(safe_open(str(directory / f), framework="np"))
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"safetensors file {str(directory / f)!r} is truncated or corrupted: {e}") from e
            self._handles[f] = handle
            for k in handle.keys():
                if k in self.key_file:
                    raise CheckpointError(f"tensor {k!r} appears in both {self.key_file[k]!r} and {f!r}")
                self.key_file[k] = f
        if weight_map is not None:
            wrong = sorted(k for k, f in weight_map.items() if self.key_file.get(k) != f)
            if wrong:
                k = wrong[0]
                raise CheckpointError(
                    f"{str(index)!r} places {len(wrong)} tensor(s) in the wrong file, e.g. {k!r} is listed in "
                    f"{weight_map[k]!r} but found in {self.key_file.get(k)!r}"
                )

    def slice(self, key: str):
        f = self.key_file[key]
        try:
            return self._handles[f].get_slice(key)
        except SafetensorError as e:
            raise CheckpointError(f"cannot read tensor {key!r} from {str(self.directory / f)!r}: {e}") from e

    def read(self, tm: TensorMap, inner: tuple, idx: list) -> np.ndarray:
        src = self.slice(tm.hf_name)
        try:
            return _read_block(src, tm.kind, inner, idx)
        except SafetensorError as e:
            f = self.directory / self.key_file[tm.hf_name]
            raise CheckpointError(f"cannot read tensor {tm.hf_name!r} from {str(f)!r}: {e}") from e


def _read_index(index: pathlib.Path) -> dict[str, str]:
    try:
        with open(index) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{str(index)!r} is not valid JSON: {e}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{str(index)!r} has no 'weight_map' object")
    return weight_map


def _short_list(names: Iterable[str], n: int = 12) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _check_names(cfg: LMConfig, table: Mapping[str, TensorMap], present: Iterable[str], directory) -> None:
    present = set(present)
    missing = set(table) - present
    unexpected = {
        k for k in present - set(table)
        if not any(p.search(k) for p in HARMLESS_EXTRA) and not (cfg.tie_embeddings and k == "lm_head.weight")
    }
    if missing or unexpected:
        parts = [f"checkpoint {str(directory)!r} does not match its config.json ({cfg.architecture}, "
                 f"{cfg.num_layers} layers{f', {cfg.num_experts} experts' if cfg.is_moe else ''})"]
        if missing:
            parts.append(f"{len(missing)} missing tensor(s): {_short_list(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s): {_short_list(unexpected)}")
        raise CheckpointError("; ".join(parts))


def _leaf_specs(cfg: LMConfig) -> dict[tuple, ParamSpec]:
    flat = jax.tree_util.tree_flatten_with_path(param_specs(cfg), is_leaf=lambda x: isinstance(x, ParamSpec))[0]
    return {tuple(p.key for p in path): spec for path, spec in flat}


def _group_by_leaf(table: Mapping[str, TensorMap]) -> dict[tuple, dict[tuple, TensorMap]]:
    groups: dict[tuple, dict[tuple, TensorMap]] = collections.defaultdict(dict)
    for tm in table.values():
        groups[tm.path][tm.index] = tm
    return groups


def _set_path(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _normalize(index: tuple, shape: tuple) -> list:
    out = []
    for s, n in zip(tuple(index) + (slice(None),) * (len(shape) - len(index)), shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"strided shard index {s} is not supported")
        out.append((start, stop))
    return out


def load_params(
    path: str | os.PathLike,
    model: DecoderLM,
    *,
    mesh: Optional[jax.sharding.Mesh] = None,
    rules=shd.DEFAULT_RULES,
) -> dict:
    """Reads the base parameters of ``model`` from the safetensors files in ``path``, in ``model.param_dtype``.

    With ``mesh``, each parameter is created with ``jax.make_array_from_callback`` in the sharding the logical-axis
    ``rules`` give it, and each device's shard reads only its own slice of the file. Without, each parameter goes
    to the default device. Method parameters are not part of a Hugging Face checkpoint and are not returned.
    """
    directory = pathlib.Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {str(directory)!r} does not exist")
    cfg = model.config
    table = hf_tensor_map(cfg)
    leaf_specs = _leaf_specs(cfg)
    groups = _group_by_leaf(table)
    np_dtype = np.dtype(model.param_dtype)
    with contextlib.ExitStack() as stack:
        sources = _Sources(directory, stack)
        _check_names(cfg, table, sources.key_file, directory)
        for leaf_path, entries in groups.items():
            spec = leaf_specs[leaf_path]
            inner = spec.shape[len(next(iter(entries))) :]
            want = _hf_shape(next(iter(entries.values())).kind, inner)
            for tm in entries.values():
                src = sources.slice(tm.hf_name)
                shape, dt = tuple(src.get_shape()), src.get_dtype()
                where = f"{str(directory / sources.key_file[tm.hf_name])!r}"
                if shape != want:
                    raise CheckpointError(
                        f"tensor {tm.hf_name!r} in {where}: expected shape {list(want)} from config.json, "
                        f"got {list(shape)}"
                    )
                if dt not in _FILE_DTYPES:
                    raise CheckpointError(
                        f"tensor {tm.hf_name!r} in {where}: dtype {dt} is not supported (expected one of "
                        f"{', '.join(_FILE_DTYPES)})"
                    )
        shardings = None
        if mesh is not None:
            axes = {p: s.axes for p, s in leaf_specs.items()}
            shardings = {
                p: jax.sharding.NamedSharding(mesh, shd.logical_to_spec(axes[p], rules, mesh, leaf_specs[p].shape))
                for p in leaf_specs
            }
        params: dict = {}
        for leaf_path, spec in leaf_specs.items():
            entries = groups[leaf_path]
            arr = _build_leaf(spec, entries, sources, np_dtype, None if shardings is None else shardings[leaf_path])
            _set_path(params, leaf_path, arr)
    return params


def _build_leaf(spec: ParamSpec, entries: dict, sources: _Sources, np_dtype, sharding) -> jax.Array:
    shape = spec.shape
    n_stack = len(next(iter(entries)))
    inner = shape[n_stack:]
    kind = next(iter(entries.values())).kind
    done: dict[tuple, np.ndarray] = {}  # replicated leaves are asked for once per device: read them once

    def block(index) -> np.ndarray:
        idx = _normalize(index, shape)
        key = tuple(idx)
        if key in done:
            return done[key]
        stack_idx, inner_idx = idx[:n_stack], idx[n_stack:]
        out = np.empty([b - a for a, b in idx], np_dtype)
        for pos in itertools.product(*(range(a, b) for a, b in stack_idx)):
            tm = entries[pos]
            assert tm.kind == kind
            local = tuple(p - a for p, (a, _) in zip(pos, stack_idx))
            out[local] = sources.read(tm, inner, inner_idx).astype(np_dtype)
        done[key] = out
        return out

    if sharding is None:
        return jax.device_put(block(()))
    return jax.make_array_from_callback(shape, sharding, block)


def load_pretrained(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    param_dtype: str = "float32",
    mesh: Optional[jax.sharding.Mesh] = None,
    rules=shd.DEFAULT_RULES,
    **config_overrides,
) -> tuple[DecoderLM, dict]:
    """``(model, params)`` from a Hugging Face checkpoint directory (``config.json`` + safetensors).

    Args:
      path: the directory (single ``model.safetensors`` or sharded with ``model.safetensors.index.json``).
      dtype: compute dtype (``"float32"`` or ``"bfloat16"``); param_dtype: storage dtype of the parameters.
      mesh: place each parameter straight into its sharding over this mesh (see ``jaxeff.sharding``).
      rules: logical-axis rules for ``mesh``.
      config_overrides: other ``LMConfig`` fields, e.g. ``scan_layers=False``, ``remat="full"``,
        ``moe_impl="dense"``.
    """
    hf = read_hf_config_dict(path)
    where = str(pathlib.Path(path) / "config.json")
    cfg = config_from_hf(hf, where=where, dtype=dtype, param_dtype=param_dtype, **config_overrides)
    model = DecoderLM(cfg)
    return model, load_params(path, model, mesh=mesh, rules=rules)


# ---- writing ----------------------------------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like ``"5GB"`` (10^9) or ``"2GiB"`` (2^30)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = _SIZE.match(str(size))
        if not m:
            raise ValueError(f"max_shard_size: expected bytes as an int or a string like '5GB', got {size!r}")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise ValueError(f"max_shard_size: expected a positive size, got {size!r}")
    return value


def _host_leaves(cfg: LMConfig, params: Mapping) -> dict[tuple, np.ndarray]:
    out = {}
    for path, spec in _leaf_specs(cfg).items():
        node: Any = params
        for k in path:
            if not isinstance(node, Mapping) or k not in node:
                raise CheckpointError(f"params: missing parameter {'/'.join(path)} (expected shape {list(spec.shape)})")
            node = node[k]
        if tuple(node.shape) != tuple(spec.shape):
            raise CheckpointError(
                f"params: {'/'.join(path)} has shape {list(node.shape)}, the config expects {list(spec.shape)}"
            )
        if isinstance(node, jax.Array) and not node.is_fully_addressable:
            raise CheckpointError(
                f"params: {'/'.join(path)} spans several processes; gather it first (save from one process)"
            )
        out[path] = np.asarray(jax.device_get(node))
    return out


def save_pretrained(
    model: DecoderLM,
    params: Mapping,
    path: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    tokenizer=None,
    extra_config: Optional[Mapping[str, Any]] = None,
) -> pathlib.Path:
    """Writes ``config.json`` and the safetensors weights in the Hugging Face layout (loadable by transformers'
    ``from_pretrained`` and by :func:`load_pretrained`), in the parameters' dtype.

    The weights go to one ``model.safetensors`` when they fit in ``max_shard_size``, else to
    ``model-0000k-of-0000n.safetensors`` files plus ``model.safetensors.index.json``. Weight files from an earlier
    save in the same directory are removed first so no stale shard survives. ``tokenizer`` (optional) is saved
    alongside; ``extra_config`` adds keys to ``config.json`` (e.g. ``pad_token_id``).
    """
    cfg = model.config
    hf_config = config_to_hf(cfg)
    if extra_config:
        hf_config.update(extra_config)
    limit = parse_size(max_shard_size)
    table = hf_tensor_map(cfg)
    leaves = _host_leaves(cfg, params)

    # Plan the shards from sizes alone, in file order (a tensor larger than the limit gets a shard of its own).
    shards: list[list[TensorMap]] = [[]]
    used = 0
    total = 0
    for tm in table.values():
        leaf = leaves[tm.path]
        nbytes = int(np.prod(leaf.shape[len(tm.index) :])) * leaf.dtype.itemsize
        if shards[-1] and used + nbytes > limit:
            shards.append([])
            used = 0
        shards[-1].append(tm)
        used += nbytes
        total += nbytes

    directory = pathlib.Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.iterdir():
        if old.name in (SINGLE_FILE, INDEX_FILE) or _SHARD_NAME.match(old.name):
            old.unlink()
    n = len(shards)
    weight_map = {}
    for k, shard in enumerate(shards):
        name = SINGLE_FILE if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        tensors = {tm.hf_name: _to_hf(tm.kind, leaves[tm.path][tm.index]) for tm in shard}
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        weight_map.update({tm.hf_name: name for tm in shard})
    if n > 1:
        with open(directory / INDEX_FILE, "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    with open(directory / "config.json", "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
        f.write("\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in a checkpoint directory (``transformers.AutoTokenizer``, local files only; torch is
    not needed)."""
    directory = pathlib.Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {str(directory)!r} does not exist")
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((directory / n).is_file() for n in names):
        raise CheckpointError(f"{str(directory)!r} has no tokenizer files (looked for {', '.join(names)})")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
