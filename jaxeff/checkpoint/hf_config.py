"""Hugging Face ``config.json`` <-> :class:`~jaxeff.models.config.LMConfig`, for Llama, Mistral, Qwen2 and Mixtral.

Reading follows what transformers 5 does with the same file, so that a checkpoint means the same model in both:

* RoPE: the v5 ``rope_parameters: {rope_theta, rope_type, ...}`` and the older top-level ``rope_theta`` plus
  ``rope_scaling: {type|rope_type, factor, ...}`` are both accepted (``rope_scaling`` wins when both are present,
  as in transformers). Supported types: ``default``, ``linear``, ``llama3``; any other type is an error naming it.
* Biases: Llama's ``attention_bias`` puts a bias on q, k, v *and* o; Qwen2 always has a q/k/v bias and never an o
  bias; Mistral and Mixtral have none. ``mlp_bias`` exists only for Llama.
* Sliding window: Mistral and Mixtral use ``sliding_window`` on every layer (Mistral's default, when the key is
  absent, is 4096 as in transformers). Qwen2 uses it only when ``use_sliding_window`` is true, and then only on
  the layers ``layer_types`` (or ``i >= max_window_layers``) marks as sliding: all layers -> a uniform window,
  none -> no window, a mix -> an error (``LMConfig`` has one window for the whole stack).
* ``eos_token_id`` may be a list (Llama 3 instruct lists several); :class:`LMConfig` holds one id, so the *first*
  is kept. Pass the full list to ``jaxeff.generate(..., stop_tokens=...)`` (see :func:`hf_eos_token_ids`).
* Mixtral's ``router_aux_loss_coef`` only counts in transformers when ``output_router_logits`` is true; it is
  read as 0 otherwise.

Writing produces the transformers-5 layout (``rope_parameters``, ``dtype``, ``architectures``) and refuses a
config the target architecture cannot express (e.g. a Llama with a sliding window) instead of dropping a field.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Mapping, Optional

from jaxeff.config import ConfigError, from_dict, to_dict
from jaxeff.models.config import LMConfig, RopeScaling


class CheckpointError(ValueError):
    """A checkpoint directory, config or weight file that cannot be read as the model it claims to be."""


SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "mixtral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
}

# transformers 5's defaults for keys a config.json may leave out.
_DEFAULTS = {
    "llama": dict(rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=2048, sliding_window=None),
    "mistral": dict(rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=131072, sliding_window=4096),
    "qwen2": dict(rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=32768, sliding_window=4096),
    "mixtral": dict(rope_theta=1e6, rms_norm_eps=1e-5, max_position_embeddings=131072, sliding_window=None),
}

# LMConfig fields that are runtime choices, not part of a checkpoint; load_pretrained takes them as overrides.
RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat", "moe_impl")


def _field(hf: Mapping[str, Any], key: str, where: str):
    if key not in hf or hf[key] is None:
        raise CheckpointError(f"{where}: required key {key!r} is missing")
    return hf[key]


def _first_id(value, key: str, where: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if not value:
            return None
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{where}: {key} must be an int or a list of ints, got {value!r}")
    return value


def hf_eos_token_ids(hf: Mapping[str, Any]) -> list[int]:
    """Every end-of-sequence id a config lists (``eos_token_id`` may be an int or a list)."""
    eos = hf.get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _rope_from_hf(hf: Mapping[str, Any], model_type: str, where: str) -> tuple[float, RopeScaling]:
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(rope, Mapping):
        raise CheckpointError(f"{where}: rope_parameters must be a mapping, got {rope!r}")
    if any(isinstance(v, Mapping) for v in rope.values()):
        raise CheckpointError(
            f"{where}: per-layer-type RoPE parameters ({sorted(rope)}) are not supported; LMConfig has one RoPE "
            "for every layer"
        )
    theta = rope.get("rope_theta", hf.get("rope_theta"))
    theta = float(_DEFAULTS[model_type]["rope_theta"] if theta is None else theta)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial is not None and float(partial) != 1.0:
        raise CheckpointError(
            f"{where}: partial_rotary_factor={partial} is not supported (RoPE on the whole head only)"
        )
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(
            f"{where}: RoPE type {rope_type!r} is not supported; supported types: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, RopeScaling()
    factor = float(_field(rope, "factor", f"{where} (rope_parameters, rope_type={rope_type!r})"))
    if rope_type == "linear":
        return theta, RopeScaling(rope_type="linear", factor=factor)
    sub = f"{where} (rope_parameters, rope_type='llama3')"
    original = rope.get("original_max_position_embeddings") or hf.get("max_position_embeddings")
    if original is None:
        raise CheckpointError(f"{sub}: required key 'original_max_position_embeddings' is missing")
    return theta, RopeScaling(
        rope_type="llama3",
        factor=factor,
        low_freq_factor=float(_field(rope, "low_freq_factor", sub)),
        high_freq_factor=float(_field(rope, "high_freq_factor", sub)),
        original_max_position_embeddings=int(original),
    )


def _qwen2_sliding_window(hf: Mapping[str, Any], num_layers: int, where: str) -> Optional[int]:
    if not hf.get("use_sliding_window", False):
        return None
    window = hf.get("sliding_window", _DEFAULTS["qwen2"]["sliding_window"])
    if window is None:
        return None
    layer_types = hf.get("layer_types")
    if layer_types is None:
        first = hf.get("max_window_layers", 28)
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    sliding = [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
    if not sliding:
        return None
    if len(sliding) != num_layers:
        raise CheckpointError(
            f"{where}: Qwen2 with a sliding window on only some layers ({sliding} of {num_layers}) is not supported; "
            "LMConfig applies one window to every layer"
        )
    return int(window)


def config_from_hf(hf: Mapping[str, Any], where: str = "config.json", **overrides) -> LMConfig:
    """Builds an :class:`LMConfig` from a parsed Hugging Face ``config.json`` (see the module docstring for the
    mapping). ``overrides`` replace fields afterwards (``dtype``, ``scan_layers``...)."""
    if not isinstance(hf, Mapping):
        raise CheckpointError(f"{where}: expected a JSON object at the top level, got {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        arch = hf.get("architectures")
        raise CheckpointError(
            f"{where}: model_type {model_type!r}{f' (architectures {arch})' if arch else ''} is not supported; "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{where}: hidden_act {act!r} is not supported (the decoder uses SwiGLU with silu)")
    defaults = _DEFAULTS[model_type]
    heads = int(_field(hf, "num_attention_heads", where))
    hidden = int(_field(hf, "hidden_size", where))
    layers = int(_field(hf, "num_hidden_layers", where))
    kv_heads = hf.get("num_key_value_heads")
    head_dim = hf.get("head_dim")
    # Stored as None when it is the default, so that a config read back from our own export compares equal.
    if head_dim is not None and heads and hidden % heads == 0 and int(head_dim) == hidden // heads:
        head_dim = None
    theta, scaling = _rope_from_hf(hf, model_type, where)

    qkv_bias = o_bias = mlp_bias = False
    sliding_window = None
    if model_type == "llama":
        qkv_bias = o_bias = bool(hf.get("attention_bias", False))
        mlp_bias = bool(hf.get("mlp_bias", False))
    elif model_type == "qwen2":
        qkv_bias = True
        sliding_window = _qwen2_sliding_window(hf, layers, where)
    else:  # mistral, mixtral: one window for every layer, or none
        sliding_window = hf.get("sliding_window", defaults["sliding_window"])

    moe = {}
    if model_type == "mixtral":
        moe = dict(
            num_experts=int(_field(hf, "num_local_experts", where)),
            num_experts_per_tok=int(hf.get("num_experts_per_tok", 2)),
            router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.0)) if hf.get("output_router_logits") else 0.0,
        )
    eps = hf.get("rms_norm_eps")
    max_pos = hf.get("max_position_embeddings")
    fields = dict(
        architecture=model_type,
        vocab_size=int(_field(hf, "vocab_size", where)),
        hidden_size=hidden,
        intermediate_size=int(_field(hf, "intermediate_size", where)),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(heads if kv_heads is None else kv_heads),
        head_dim=None if head_dim is None else int(head_dim),
        rms_norm_eps=float(defaults["rms_norm_eps"] if eps is None else eps),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(defaults["max_position_embeddings"] if max_pos is None else max_pos),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        sliding_window=None if sliding_window is None else int(sliding_window),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        bos_token_id=_first_id(hf.get("bos_token_id"), "bos_token_id", where),
        eos_token_id=_first_id(hf.get("eos_token_id"), "eos_token_id", where),
        **moe,
    )
    try:
        cfg = LMConfig(**fields)
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return _replace(cfg, overrides, where)


def _replace(cfg: LMConfig, overrides: Mapping[str, Any], where: str) -> LMConfig:
    if not overrides:
        return cfg
    known = {f.name for f in dataclasses.fields(LMConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise CheckpointError(f"unknown LMConfig field(s) {unknown} in the overrides; known fields: {sorted(known)}")
    try:
        # Through the typed-config builder, so a value of the wrong type or outside a Literal is caught too.
        return from_dict(LMConfig, {**to_dict(cfg), **overrides}, "model")
    except ConfigError as e:
        raise CheckpointError(f"{where} with overrides {dict(overrides)}: {e}") from None


def read_hf_config_dict(path: str | pathlib.Path) -> dict:
    """The parsed ``config.json`` of a checkpoint directory (or the file itself)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {str(path)!r} does not exist")
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"checkpoint directory {str(path)!r} has no config.json")
    try:
        with open(file) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{str(file)!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{str(file)!r}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def read_hf_config(path: str | pathlib.Path, **overrides) -> LMConfig:
    """``LMConfig`` from a checkpoint directory's ``config.json`` (or that file), plus field overrides."""
    file = pathlib.Path(path)
    file = file / "config.json" if file.is_dir() else file
    return config_from_hf(read_hf_config_dict(path), where=str(file), **overrides)


def _rope_to_hf(cfg: LMConfig) -> dict:
    s = cfg.rope_scaling
    out: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": s.rope_type}
    if s.rope_type in ("linear", "llama3"):
        out["factor"] = s.factor
    if s.rope_type == "llama3":
        out.update(
            low_freq_factor=s.low_freq_factor,
            high_freq_factor=s.high_freq_factor,
            original_max_position_embeddings=s.original_max_position_embeddings,
        )
    return out


def _unsupported(arch: str, field: str, value) -> CheckpointError:
    return CheckpointError(
        f"cannot export to Hugging Face {arch!r}: LMConfig.{field}={value!r} has no equivalent in that architecture"
    )


def config_to_hf(cfg: LMConfig) -> dict:
    """The transformers-5 ``config.json`` dict for ``cfg``. Raises when the architecture cannot express it."""
    arch = cfg.architecture
    if arch not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"LMConfig.architecture {arch!r} is not one of {SUPPORTED_MODEL_TYPES}")
    if cfg.is_moe and arch != "mixtral":
        raise _unsupported(arch, "num_experts", cfg.num_experts)
    if arch != "llama":
        if cfg.mlp_bias:
            raise _unsupported(arch, "mlp_bias", True)
        if cfg.o_bias:
            raise _unsupported(arch, "o_bias", True)
        if cfg.qkv_bias != (arch == "qwen2"):
            raise _unsupported(arch, "qkv_bias", cfg.qkv_bias)
    elif cfg.qkv_bias != cfg.o_bias:
        raise CheckpointError(
            "cannot export to Hugging Face 'llama': attention_bias covers q, k, v and o together, but "
            f"LMConfig has qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias}"
        )
    if arch == "llama" and cfg.sliding_window is not None:
        raise _unsupported(arch, "sliding_window", cfg.sliding_window)
    hf: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.initializer_range,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": _rope_to_hf(cfg),
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "attention_dropout": 0.0,
        "use_cache": True,
        "dtype": cfg.param_dtype,
    }
    if arch == "llama":
        hf.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    elif arch == "qwen2":
        window = cfg.sliding_window
        hf.update(
            use_sliding_window=window is not None,
            sliding_window=window,
            max_window_layers=0 if window is not None else cfg.num_layers,
            layer_types=[("sliding_attention" if window is not None else "full_attention")] * cfg.num_layers,
        )
    else:
        hf["sliding_window"] = cfg.sliding_window
    if arch == "mixtral":
        hf.update(
            num_local_experts=cfg.num_experts,
            num_experts_per_tok=cfg.num_experts_per_tok,
            router_aux_loss_coef=cfg.router_aux_loss_coef,
            output_router_logits=cfg.router_aux_loss_coef > 0,
        )
    return hf
