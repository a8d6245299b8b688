"""diffusers ``WanTransformer3DModel`` checkpoints: import into ``jaxeff.models.vdit`` and export back.

    model, params = load_wan_transformer("Wan2.1-T2V-1.3B-Diffusers/transformer")        # float32
    model, params = load_wan_transformer(d, dtype="bfloat16", remat=True)
    save_wan_transformer(model, params, "out_dir")    # WanTransformer3DModel.from_pretrained("out_dir") loads it

A checkpoint is a diffusers ``save_pretrained`` directory: ``config.json`` plus ``diffusion_pytorch_model.safetensors``
or the sharded form (``diffusion_pytorch_model.safetensors.index.json`` and its ``-0000k-of-0000n`` shards). Files
are read with ``safetensors``' numpy backend (no torch). Only the text-to-video transformer is supported: configs
with image-to-video fields raise :class:`jaxeff.config.ConfigError`.

Names and layouts (one table, :func:`wan_tensor_map`; ours are in ``jaxeff.models.vdit``). Torch ``nn.Linear``
stores ``[out, in]``; we store ``[in, out]`` with heads split and layers stacked on axis 0::

    patch_embedding.weight [d, C, pt, ph, pw]          -> patch_embed/kernel [C, pt, ph, pw, d]
    condition_embedder.time_embedder.linear_{1,2}      -> time_embed/fc{1,2}
    condition_embedder.time_proj.weight [6d, d]        -> time_proj/kernel [d, 6, d]   (bias [6d] -> [6, d])
    condition_embedder.text_embedder.linear_{1,2}      -> text_embed/fc{1,2}
    blocks.{i}.scale_shift_table [1, 6, d]             -> layers/scale_shift_table [L, 6, d]
    blocks.{i}.attn1|attn2.to_{q,k,v}.weight [H*D, d]  -> layers/self_attn|cross_attn/{q,k,v}/kernel [L, d, H, D]
    blocks.{i}.attn1|attn2.to_out.0.weight [d, H*D]    -> layers/self_attn|cross_attn/o/kernel [L, H, D, d]
    blocks.{i}.attn1|attn2.norm_{q,k}.weight [H*D]     -> layers/.../{q,k}_norm/scale [L, H, D]
    blocks.{i}.norm2.{weight,bias} [d]                 -> layers/cross_norm/{scale,bias} [L, d]
    blocks.{i}.ffn.net.0.proj / ffn.net.2              -> layers/mlp/up / layers/mlp/down
    scale_shift_table [1, 2, d]                        -> out/scale_shift_table [2, d]
    proj_out.weight [pt*ph*pw*C_out, d]                -> out/proj/kernel [d, pt, ph, pw, C_out]

Loading checks every name and shape against the config before building the parameters and raises
:class:`CheckpointError` listing the missing and unexpected tensors and the shape mismatches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import re
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxeff.checkpoint.hf import parse_size
from jaxeff.checkpoint.hf_config import CheckpointError, read_hf_config_dict
from jaxeff.models.vdit import ParamSpec, VDiTConfig, VideoDiT, param_specs

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
_SHARD_NAME = re.compile(r"^diffusion_pytorch_model-\d{5}-of-\d{5}\.safetensors$")
_FILE_DTYPES = ("F64", "F32", "F16", "BF16")
# Written as ``_diffusers_version`` when diffusers itself is not installed (informational only).
_DIFFUSERS_VERSION_FALLBACK = "0.33.0"


@dataclasses.dataclass(frozen=True)
class WanTensor:
    """One diffusers tensor and where it goes.

    path: our parameter path; index: ``(layer,)`` for stacked block parameters, else ``()``; shape: the on-disk
    shape; kind: the layout change from the on-disk tensor to our slice, one of
      ``linear``   ours = theirs.T reshaped (torch Linear ``[out, in]`` -> ``[in, *out]`` or ``[*in, out]``);
      ``reshape``  ours = theirs reshaped (biases split by head, ``[1, 6, d]`` tables);
      ``conv``     ours ``[C, pt, ph, pw, d]`` <- Conv3d weight ``[d, C, pt, ph, pw]``.
    """

    name: str
    path: tuple
    index: tuple
    shape: tuple
    kind: str


def wan_tensor_map(cfg: VDiTConfig) -> dict[str, WanTensor]:
    """Every tensor name of ``cfg``'s diffusers checkpoint and where it goes."""
    d, H, D, I = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim, cfg.ffn_dim
    pt, ph, pw = cfg.patch_size
    out: dict[str, WanTensor] = {}

    def add(name, path, shape, kind, index=()):
        out[name] = WanTensor(name, tuple(path.split("/")), tuple(index), tuple(shape), kind)

    def linear(prefix, path, n_in, n_out, index=()):
        add(prefix + ".weight", path + "/kernel", (n_out, n_in), "linear", index)
        add(prefix + ".bias", path + "/bias", (n_out,), "reshape", index)

    add("patch_embedding.weight", "patch_embed/kernel", (d, cfg.in_channels, pt, ph, pw), "conv")
    add("patch_embedding.bias", "patch_embed/bias", (d,), "reshape")
    ce = "condition_embedder."
    linear(ce + "time_embedder.linear_1", "time_embed/fc1", cfg.freq_dim, d)
    linear(ce + "time_embedder.linear_2", "time_embed/fc2", d, d)
    linear(ce + "time_proj", "time_proj", d, 6 * d)
    linear(ce + "text_embedder.linear_1", "text_embed/fc1", cfg.text_dim, d)
    linear(ce + "text_embedder.linear_2", "text_embed/fc2", d, d)
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        add(p + "scale_shift_table", "layers/scale_shift_table", (1, 6, d), "reshape", (i,))
        for theirs, ours in (("attn1", "self_attn"), ("attn2", "cross_attn")):
            for n in "qkv":
                linear(p + f"{theirs}.to_{n}", f"layers/{ours}/{n}", d, H * D, (i,))
            linear(p + f"{theirs}.to_out.0", f"layers/{ours}/o", H * D, d, (i,))
            if cfg.qk_norm is not None:
                for n in "qk":
                    add(p + f"{theirs}.norm_{n}.weight", f"layers/{ours}/{n}_norm/scale", (H * D,), "reshape", (i,))
        if cfg.cross_attn_norm:
            add(p + "norm2.weight", "layers/cross_norm/scale", (d,), "reshape", (i,))
            add(p + "norm2.bias", "layers/cross_norm/bias", (d,), "reshape", (i,))
        linear(p + "ffn.net.0.proj", "layers/mlp/up", d, I, (i,))
        linear(p + "ffn.net.2", "layers/mlp/down", I, d, (i,))
    add("scale_shift_table", "out/scale_shift_table", (1, 2, d), "reshape")
    linear("proj_out", "out/proj", d, pt * ph * pw * cfg.out_channels)
    return out


def _to_ours(kind: str, arr: np.ndarray, inner: tuple) -> np.ndarray:
    if kind == "linear":
        return arr.T.reshape(inner)
    if kind == "reshape":
        return arr.reshape(inner)
    if kind == "conv":
        return arr.transpose(1, 2, 3, 4, 0)
    raise AssertionError(kind)


def _to_theirs(kind: str, arr: np.ndarray, shape: tuple) -> np.ndarray:
    if kind == "linear":
        out = arr.reshape(shape[::-1]).T
    elif kind == "reshape":
        out = arr.reshape(shape)
    elif kind == "conv":
        out = arr.transpose(4, 0, 1, 2, 3)
    else:
        raise AssertionError(kind)
    return np.ascontiguousarray(out)


def _leaf_specs(cfg: VDiTConfig) -> dict[tuple, ParamSpec]:
    flat = jax.tree_util.tree_flatten_with_path(param_specs(cfg), is_leaf=lambda x: isinstance(x, ParamSpec))[0]
    return {tuple(p.key for p in path): spec for path, spec in flat}


def _set_path(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _short_list(names, n: int = 12) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


# ---- reading --------------------------------------------------------------------------------------------------


def _weight_files(directory: pathlib.Path) -> tuple[list[str], Optional[dict]]:
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            data = json.loads(index.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{str(index)!r} is not valid JSON: {e}") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{str(index)!r} has no 'weight_map' object")
        files = sorted(set(weight_map.values()))
        absent = [f for f in files if not (directory / f).is_file()]
        if absent:
            raise CheckpointError(f"{str(index)!r} lists shard file(s) that do not exist in {str(directory)!r}: "
                                  f"{absent}")
        return files, weight_map
    if (directory / WEIGHTS_NAME).is_file():
        return [WEIGHTS_NAME], None
    found = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    hint = f" (found {found}: only safetensors is supported)" if found else ""
    raise CheckpointError(f"{str(directory)!r} has neither {WEIGHTS_NAME} nor {INDEX_NAME}{hint}")


def load_wan_params(path: str | os.PathLike, model: VideoDiT) -> dict:
    """The parameters of ``model`` from the safetensors files in ``path`` (in ``model.param_dtype``)."""
    directory = pathlib.Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {str(directory)!r} does not exist")
    cfg = model.config
    table = wan_tensor_map(cfg)
    files, weight_map = _weight_files(directory)
    np_dtype = np.dtype(model.param_dtype)
    leaves = {p: np.empty(s.shape, np_dtype) for p, s in _leaf_specs(cfg).items()}
    handles: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        key_file: dict[str, str] = {}
        for f in files:
            try:
                handles[f] = stack.enter_context(safe_open(str(directory / f), framework="np"))
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"safetensors file {str(directory / f)!r} is truncated or corrupted: {e}") \
                    from e
            for k in handles[f].keys():
                if k in key_file:
                    raise CheckpointError(f"tensor {k!r} appears in both {key_file[k]!r} and {f!r}")
                key_file[k] = f
        if weight_map is not None:
            wrong = sorted(k for k, f in weight_map.items() if key_file.get(k) != f)
            if wrong:
                raise CheckpointError(f"{str(directory / INDEX_NAME)!r} places {len(wrong)} tensor(s) in the wrong "
                                      f"file, e.g. {wrong[0]!r} is listed in {weight_map[wrong[0]]!r} but found in "
                                      f"{key_file.get(wrong[0])!r}")
        missing = set(table) - set(key_file)
        unexpected = set(key_file) - set(table)
        mismatched, bad_dtype = [], []
        for name in sorted(set(table) & set(key_file)):
            sl = handles[key_file[name]].get_slice(name)
            shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
            if shape != table[name].shape:
                mismatched.append(f"{name} {list(shape)} (expected {list(table[name].shape)})")
            if dtype not in _FILE_DTYPES:
                bad_dtype.append(f"{name} {dtype}")
        if missing or unexpected or mismatched or bad_dtype:
            parts = [f"checkpoint {str(directory)!r} does not match its config.json ({cfg.num_layers} layers, "
                     f"{cfg.num_attention_heads} heads x {cfg.attention_head_dim}, patch {cfg.patch_size})"]
            if missing:
                parts.append(f"{len(missing)} missing tensor(s): {_short_list(missing)}")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected tensor(s): {_short_list(unexpected)}")
            if mismatched:
                parts.append(f"{len(mismatched)} shape mismatch(es): {_short_list(mismatched)}")
            if bad_dtype:
                parts.append(f"{len(bad_dtype)} tensor(s) of a non-float dtype (expected one of "
                             f"{', '.join(_FILE_DTYPES)}): {_short_list(bad_dtype)}")
            raise CheckpointError("; ".join(parts))
        for name, tm in table.items():
            leaf = leaves[tm.path]
            inner = leaf.shape[len(tm.index):]
            try:
                arr = handles[key_file[name]].get_tensor(name)
            except SafetensorError as e:
                raise CheckpointError(f"cannot read tensor {name!r} from {str(directory / key_file[name])!r}: {e}") \
                    from e
            leaf[tm.index] = _to_ours(tm.kind, arr, inner).astype(np_dtype)
    params: dict = {}
    for p, arr in leaves.items():
        _set_path(params, p, jnp.asarray(arr))
    return params


def load_wan_transformer(
    path: str | os.PathLike,
    *,
    dtype: Optional[str] = None,
    param_dtype: Optional[str] = None,
    **config_overrides,
) -> tuple[VideoDiT, dict]:
    """``(model, params)`` from a diffusers ``WanTransformer3DModel`` directory.

    Args:
      path: the ``save_pretrained`` directory (e.g. the ``transformer/`` folder of a Wan pipeline).
      dtype: compute dtype, ``"float32"`` (default) or ``"bfloat16"``.
      param_dtype: storage dtype of the parameters; default: ``dtype``.
      config_overrides: other ``VDiTConfig`` fields, e.g. ``remat=True``.
    """
    dtype = dtype or "float32"
    param_dtype = param_dtype or dtype
    where = str(pathlib.Path(path) / "config.json")
    raw = read_hf_config_dict(path)
    cfg = VDiTConfig.from_diffusers_config(raw, where=where, dtype=dtype, param_dtype=param_dtype,
                                           **config_overrides)
    model = VideoDiT(cfg)
    return model, load_wan_params(path, model)


# ---- writing --------------------------------------------------------------------------------------------------


def _host_leaves(cfg: VDiTConfig, params: Mapping) -> dict[tuple, np.ndarray]:
    out = {}
    for path, spec in _leaf_specs(cfg).items():
        node: Any = params
        for k in path:
            if not isinstance(node, Mapping) or k not in node:
                raise CheckpointError(f"params: missing parameter {'/'.join(path)} (expected shape {list(spec.shape)})")
            node = node[k]
        if tuple(node.shape) != tuple(spec.shape):
            raise CheckpointError(f"params: {'/'.join(path)} has shape {list(node.shape)}, the config expects "
                                  f"{list(spec.shape)}")
        out[path] = np.asarray(jax.device_get(node))
    return out


def _diffusers_version() -> str:
    try:
        from importlib.metadata import version

        return version("diffusers")
    except Exception:  # not installed: the field is informational
        return _DIFFUSERS_VERSION_FALLBACK


def save_wan_transformer(
    model: VideoDiT,
    params: Mapping,
    path: str | os.PathLike,
    *,
    max_shard_size: int | str = "10GB",
) -> pathlib.Path:
    """Writes ``config.json`` (``_class_name: WanTransformer3DModel``) and the safetensors weights in diffusers'
    layout, in the parameters' dtype, so ``WanTransformer3DModel.from_pretrained(path)`` and
    :func:`load_wan_transformer` load it. Weights beyond ``max_shard_size`` go to
    ``diffusion_pytorch_model-0000k-of-0000n.safetensors`` shards plus the index file; weight files of an earlier
    save in the same directory are removed first."""
    cfg = model.config
    config = cfg.to_diffusers_config()
    config["_diffusers_version"] = _diffusers_version()
    limit = parse_size(max_shard_size)
    table = wan_tensor_map(cfg)
    leaves = _host_leaves(cfg, params)

    shards: list[list[WanTensor]] = [[]]
    used = total = 0
    for tm in table.values():
        nbytes = math.prod(tm.shape) * leaves[tm.path].dtype.itemsize
        if shards[-1] and used + nbytes > limit:
            shards.append([])
            used = 0
        shards[-1].append(tm)
        used += nbytes
        total += nbytes

    directory = pathlib.Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.iterdir():
        if old.name in (WEIGHTS_NAME, INDEX_NAME) or _SHARD_NAME.match(old.name):
            old.unlink()
    n = len(shards)
    weight_map = {}
    for k, shard in enumerate(shards):
        name = WEIGHTS_NAME if n == 1 else f"diffusion_pytorch_model-{k + 1:05d}-of-{n:05d}.safetensors"
        tensors = {tm.name: _to_theirs(tm.kind, leaves[tm.path][tm.index], tm.shape) for tm in shard}
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        weight_map.update({tm.name: name for tm in shard})
    if n > 1:
        with open(directory / INDEX_NAME, "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    with open(directory / "config.json", "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    return directory
