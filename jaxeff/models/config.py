"""Static configuration of the decoder LM (Llama 2/3, Mistral, Qwen2, SmolLM2, Mixtral)."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from jaxeff.config import ConfigError, config_error

ARCHITECTURES = ("llama", "mistral", "qwen2", "mixtral")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. ``default`` means none; ``llama3`` is Llama 3.1's piecewise scaling;
    ``linear`` divides every position by ``factor``."""

    rope_type: Literal["default", "llama3", "linear"] = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """One config for the whole decoder family.

    ``architecture`` only selects the Hugging Face name mapping and ``model_type`` on export; the forward pass is
    driven by the flags (``qkv_bias`` for Qwen2, ``sliding_window`` for Mistral, ``num_experts`` for Mixtral,
    ``tie_embeddings`` for SmolLM2 and the small Llamas).
    """

    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 176
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: Optional[int] = None  # default hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 2048
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: Optional[int] = None
    # Mixtral sparse MoE feed-forward (num_experts == 0: dense SwiGLU MLP).
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_impl: Literal["dense", "ragged"] = "ragged"
    router_aux_loss_coef: float = 0.0
    architecture: Literal["llama", "mistral", "qwen2", "mixtral"] = "llama"
    # Numerics and compilation.
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype (activations, matmul inputs)
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # storage dtype of the parameters
    scan_layers: bool = True  # lax.scan over the layer stack: one layer compiled, not L
    remat: Literal["none", "full", "dots"] = "none"  # rematerialise each layer in the backward pass
    initializer_range: float = 0.02
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise config_error(f"model.{name}", "a positive int", v)
        if self.num_heads % self.num_kv_heads:
            raise config_error(
                "model.num_kv_heads",
                f"a divisor of num_heads={self.num_heads} (grouped-query attention)",
                self.num_kv_heads,
            )
        if self.head_dim is not None and (self.head_dim <= 0 or self.head_dim % 2):
            raise config_error("model.head_dim", "a positive even int (RoPE rotates pairs)", self.head_dim)
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise config_error(
                "model.hidden_size", f"a multiple of num_heads={self.num_heads} when head_dim is not set",
                self.hidden_size,
            )
        if self.head_dim is None and (self.hidden_size // self.num_heads) % 2:
            raise config_error("model.head_dim", "an even head size", self.hidden_size // self.num_heads)
        if self.num_experts < 0:
            raise config_error("model.num_experts", "0 (dense MLP) or a positive number of experts", self.num_experts)
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise config_error(
                "model.num_experts_per_tok", f"between 1 and num_experts={self.num_experts}", self.num_experts_per_tok
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise config_error("model.sliding_window", "a positive int or null", self.sliding_window)
        if self.rms_norm_eps <= 0:
            raise config_error("model.rms_norm_eps", "a positive float", self.rms_norm_eps)
        if self.rope_theta <= 0:
            raise config_error("model.rope_theta", "a positive float", self.rope_theta)
        if self.architecture == "mixtral" and not self.num_experts:
            raise ConfigError("config field 'model.num_experts': architecture 'mixtral' needs num_experts > 0, got 0")

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        d, i, hd = self.hidden_size, self.intermediate_size, self.head_size
        attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.qkv_bias:
            attn += hd * (self.num_heads + 2 * self.num_kv_heads)
        if self.o_bias:
            attn += d
        mlp = 3 * d * i * max(self.num_experts, 1) + (d * self.num_experts if self.is_moe else 0)
        if self.mlp_bias and not self.is_moe:
            mlp += 2 * i + d
        per_layer = attn + mlp + 2 * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * per_layer + d + head
