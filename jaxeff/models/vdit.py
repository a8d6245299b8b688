"""A Wan 2.1-style text-to-video diffusion transformer (video DiT), pure-functional.

``VideoDiT`` is a frozen, hashable description (a ``VDiTConfig``); parameters are a plain nested dict::

    model = VideoDiT(VDiTConfig(...))
    params = model.init(jax.random.key(0))                       # layer weights stacked [L, ...]
    out = model.apply(params, latents, timesteps, text_embeds)   # latents [B, C, F, H, W] -> out.sample, same layout
    out = model.apply(params, latents, timesteps, text_embeds, self_attention=hook, return_attention_outputs=True)

The architecture is that of diffusers' ``WanTransformer3DModel`` (text-to-video), whose checkpoints
``jaxeff.checkpoint.diffusers_wan`` reads and writes; with the same weights the two agree to float32 rounding:

* 3D patch embedding (a Conv3d with kernel = stride = ``patch_size``, done as a reshape and one matmul). Video
  tokens are frame-major: token ``n = (t * Hp + h) * Wp + w`` (:meth:`VideoDiT.token_grid` gives ``(T, Hp, Wp)``),
  so the ``Hp * Wp`` tokens of one latent frame are contiguous.
* 3D RoPE: ``head_dim`` ``D`` splits into ``D - 4 * (D // 6)`` channels rotated by the frame index and
  ``2 * (D // 6)`` each by the row and the column index (theta 10000), rotating interleaved pairs
  ``(x[2i], x[2i+1])`` as complex numbers. Every grid extent must be at most ``rope_max_seq_len``.
* Conditioning: the timestep's sinusoidal embedding (``freq_dim``, cos half first) -> Linear-SiLU-Linear gives
  ``temb [B, d]`` (kept in float32); ``time_proj(SiLU(temb))`` gives the six adaLN vectors ``[B, 6, d]`` (shift,
  scale, gate of the self-attention; shift, scale, gate of the FFN), to which each block adds its own learned
  ``scale_shift_table [6, d]``. The text goes through Linear-GELU(tanh)-Linear.
* Each block: float32 LayerNorm without affine, modulated -> self-attention (q/k RMSNorm across all heads, then
  RoPE) -> gated residual; [LayerNorm with affine when ``cross_attn_norm``] -> cross-attention to the text (q/k
  RMSNorm, no RoPE) -> residual; LayerNorm, modulated -> FFN (GELU tanh) -> gated residual. Residual updates and
  modulation are computed in float32 and stored in the compute dtype, as Wan does.
* Output: LayerNorm, modulated by ``scale_shift_table [2, d] + temb`` (shift, scale), a projection to
  ``pt * ph * pw * C_out`` per token and the inverse of the patchify.

Layers run in a Python loop over the stacked ``[L, ...]`` parameters (layer ``l`` reads ``params[...][l]``), not a
``lax.scan``: sparse-attention methods pass a different static attention pattern per layer, which the hook receives
as the Python int ``layer_index``. ``remat=True`` wraps each layer in ``jax.checkpoint``.

The self-attention hook: ``self_attention(q, k, v, layer_index) -> out`` with q, k, v ``[B, heads, N, head_dim]``
(after q/k-norm and RoPE) returning ``[B, heads, N, head_dim]``; the hook applies the softmax scale
``head_dim ** -0.5`` itself. ``None`` is :func:`dense_self_attention`. Cross-attention always runs dense.

Attention outputs for layer-wise distillation (``return_attention_outputs=True``) are the hook's outputs with the
heads merged, *before* the output projection ``to_out``: ``[L, B, N, heads * head_dim]`` in the compute dtype. They
are exactly what the (sparse) attention pattern changes, without the projection's mixing.

Initialisation from scratch (:meth:`VideoDiT.init`; a documented choice, diffusers only has torch's defaults):
linear/conv kernels ``N(0, 0.02)``, biases zero, RMSNorm/LayerNorm scales one, and the scale-shift tables
``N(0, 1) / sqrt(d)`` as Wan initialises them.

Parameter layout (``L`` layers, ``d = heads * head_dim`` hidden, ``H`` heads of ``D``, ``I = ffn_dim``, ``C``/``C_out``
channels, patch ``(pt, ph, pw)``)::

    patch_embed/kernel [C, pt, ph, pw, d]   patch_embed/bias [d]
    time_embed/{fc1: kernel [freq_dim, d], fc2: kernel [d, d]} (+ bias [d])
    time_proj/kernel [d, 6, d]              time_proj/bias [6, d]
    text_embed/{fc1: kernel [text_dim, d], fc2: kernel [d, d]} (+ bias [d])
    layers/scale_shift_table [L, 6, d]
    layers/{self_attn,cross_attn}/{q,k,v}/kernel [L, d, H, D]   .../{q,k,v}/bias [L, H, D]
    layers/{self_attn,cross_attn}/o/kernel [L, H, D, d]         .../o/bias [L, d]
    layers/{self_attn,cross_attn}/{q_norm,k_norm}/scale [L, H, D]           (when qk_norm)
    layers/cross_norm/{scale,bias} [L, d]                                   (when cross_attn_norm)
    layers/mlp/up/kernel [L, d, I]  up/bias [L, I]   layers/mlp/down/kernel [L, I, d]  down/bias [L, d]
    out/scale_shift_table [2, d]   out/proj/kernel [d, pt, ph, pw, C_out]   out/proj/bias [pt, ph, pw, C_out]
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Literal, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff import sharding as shd
from jaxeff.config import ConfigError, config_error

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_F32 = jnp.float32

QK_NORMS = ("rms_norm_across_heads",)
ROPE_THETA = 10000.0

# diffusers' WanTransformer3DModel.__init__ defaults: what a config.json that omits a key means.
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 40,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 13824,
    "num_layers": 40,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
    "pos_embed_seq_len": None,
}
# Image-to-video / VACE-style extras: their tensors have no place in the text-to-video model.
_UNSUPPORTED_DIFFUSERS = ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")
DIFFUSERS_CLASS_NAME = "WanTransformer3DModel"


@dataclasses.dataclass(frozen=True)
class VDiTConfig:
    """Static architecture of the video DiT. The first fields mirror diffusers' ``WanTransformer3DModel`` config
    (same names and meanings); ``dtype``/``param_dtype``/``remat`` are jaxeff's. The defaults are a small
    CPU-sized model (the repo's ``configs/vdit_tiny.yaml``), not Wan's 14B defaults."""

    patch_size: tuple[int, int, int] = (1, 4, 4)
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    in_channels: int = 3
    out_channels: int = 3
    text_dim: int = 32
    freq_dim: int = 64
    ffn_dim: int = 256
    num_layers: int = 4
    cross_attn_norm: bool = True
    qk_norm: Optional[Literal["rms_norm_across_heads"]] = "rms_norm_across_heads"
    eps: float = 1e-6
    rope_max_seq_len: int = 64
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype (activations, matmul inputs)
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # storage dtype of the parameters
    remat: bool = False  # rematerialise each layer in the backward pass (jax.checkpoint)

    def __post_init__(self):
        ps = self.patch_size
        if (not isinstance(ps, (tuple, list)) or len(ps) != 3
                or not all(isinstance(p, (int, np.integer)) and not isinstance(p, bool) and p > 0 for p in ps)):
            raise config_error("model.patch_size", "three positive ints (t, h, w)", ps)
        object.__setattr__(self, "patch_size", tuple(int(p) for p in ps))
        for name in ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
                     "freq_dim", "ffn_dim", "num_layers", "rope_max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise config_error(f"model.{name}", "a positive int", v)
        hd = self.attention_head_dim
        if hd % 2 or hd < 6:
            raise config_error(
                "model.attention_head_dim",
                "an even int >= 6 (3D RoPE splits head_dim into D - 4*(D//6) frame, 2*(D//6) row and 2*(D//6) "
                "column channels, each a whole number of rotated pairs)", hd)
        if self.qk_norm is not None and self.qk_norm not in QK_NORMS:
            raise config_error("model.qk_norm", f"one of {QK_NORMS} or None", self.qk_norm)
        if not isinstance(self.cross_attn_norm, bool):
            raise config_error("model.cross_attn_norm", "a bool", self.cross_attn_norm)
        if not isinstance(self.eps, (int, float)) or isinstance(self.eps, bool) or not self.eps > 0:
            raise config_error("model.eps", "a positive float", self.eps)
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise config_error(f"model.{name}", f"one of {tuple(_DTYPES)}", getattr(self, name))
        if not isinstance(self.remat, bool):
            raise config_error("model.remat", "a bool", self.remat)

    @property
    def inner_dim(self) -> int:
        """Hidden width ``d = num_attention_heads * attention_head_dim``."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Channels of ``head_dim`` rotated by the frame, row and column index (Wan's split)."""
        hw = 2 * (self.attention_head_dim // 6)
        return self.attention_head_dim - 2 * hw, hw, hw

    # ---- diffusers config.json ----------------------------------------------------------------------------------

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any], *, where: str = "diffusers config",
                              **overrides) -> "VDiTConfig":
        """The config of a diffusers ``WanTransformer3DModel`` (its ``config.json`` as a dict). Keys it omits take
        diffusers' defaults; keys starting with ``_`` are metadata. ``overrides`` set other fields (``dtype``,
        ``param_dtype``, ``remat``). Image-to-video configs (``image_dim``, ``added_kv_proj_dim``,
        ``pos_embed_seq_len``) and unknown keys raise :class:`ConfigError`."""
        if not isinstance(config, Mapping):
            raise ConfigError(f"{where}: expected a JSON object, got {type(config).__name__}")
        cls_name = config.get("_class_name")
        if cls_name is not None and cls_name != DIFFUSERS_CLASS_NAME:
            raise ConfigError(f"{where}: field '_class_name': expected {DIFFUSERS_CLASS_NAME!r} (only the "
                              f"text-to-video Wan transformer is supported), got {cls_name!r}")
        unknown = sorted(k for k in config if not k.startswith("_") and k not in DIFFUSERS_DEFAULTS)
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {unknown} for {DIFFUSERS_CLASS_NAME}; known fields: "
                              f"{sorted(DIFFUSERS_DEFAULTS)}")
        merged = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
        for key in _UNSUPPORTED_DIFFUSERS:
            if merged[key] is not None:
                raise ConfigError(
                    f"{where}: field '{key}': expected null (only the text-to-video Wan transformer is supported; "
                    f"image-to-video conditioning is not implemented), got {merged[key]!r}")
        if merged["qk_norm"] not in QK_NORMS:
            # diffusers builds and applies the q/k RMSNorm whatever this field says, so no other value describes
            # what its checkpoints compute.
            raise ConfigError(f"{where}: field 'qk_norm': expected one of {QK_NORMS} (diffusers' Wan always "
                              f"applies RMSNorm across heads to q and k), got {merged['qk_norm']!r}")
        fields = {k: merged[k] for k in DIFFUSERS_DEFAULTS if k not in _UNSUPPORTED_DIFFUSERS}
        if fields["out_channels"] is None:  # diffusers: out_channels or in_channels
            fields["out_channels"] = fields["in_channels"]
        if isinstance(fields["patch_size"], list):
            fields["patch_size"] = tuple(fields["patch_size"])
        own = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(overrides) - own)
        if bad:
            raise ConfigError(f"unknown VDiTConfig field(s) {bad}; known fields: {sorted(own)}")
        fields.update(overrides)
        return cls(**fields)

    def to_diffusers_config(self) -> dict[str, Any]:
        """The ``config.json`` dict diffusers' ``WanTransformer3DModel.from_pretrained`` reads."""
        if self.qk_norm is None:
            raise ConfigError("config field 'model.qk_norm': expected 'rms_norm_across_heads' to export to "
                              "diffusers (its Wan transformer always applies the q/k RMSNorm), got None")
        out: dict[str, Any] = {"_class_name": DIFFUSERS_CLASS_NAME}
        for key in DIFFUSERS_DEFAULTS:
            out[key] = None if key in _UNSUPPORTED_DIFFUSERS else getattr(self, key)
        out["patch_size"] = list(self.patch_size)
        out["eps"] = float(self.eps)
        return out


class VDiTOutput(NamedTuple):
    """sample: the prediction ``[B, C_out, F, H, W]`` float32; attention_outputs: ``[L, B, N, heads * head_dim]``
    (each layer's self-attention output before its output projection) when requested, else None."""

    sample: jax.Array
    attention_outputs: Optional[jax.Array] = None


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple
    axes: tuple
    init: str  # "normal" | "ones" | "zeros" | "table" (N(0, 1) / sqrt(d))


def param_specs(cfg: VDiTConfig) -> dict:
    """Shapes, logical axes and initialisers of every parameter (the layout in the module docstring)."""
    L, d, H, D = cfg.num_layers, cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim
    I, C, Co = cfg.ffn_dim, cfg.in_channels, cfg.out_channels
    pt, ph, pw = cfg.patch_size

    def linear(n_in, n_out, in_axis, out_axis):
        return {"kernel": ParamSpec((n_in, n_out), (in_axis, out_axis), "normal"),
                "bias": ParamSpec((n_out,), (out_axis,), "zeros")}

    def attention():
        def proj():
            return {"kernel": ParamSpec((L, d, H, D), ("layers", "embed", "q_heads", "head_dim"), "normal"),
                    "bias": ParamSpec((L, H, D), ("layers", "q_heads", "head_dim"), "zeros")}

        out = {"q": proj(), "k": proj(), "v": proj(),
               "o": {"kernel": ParamSpec((L, H, D, d), ("layers", "q_heads", "head_dim", "embed"), "normal"),
                     "bias": ParamSpec((L, d), ("layers", "embed"), "zeros")}}
        if cfg.qk_norm is not None:
            for n in ("q_norm", "k_norm"):
                out[n] = {"scale": ParamSpec((L, H, D), ("layers", "q_heads", "head_dim"), "ones")}
        return out

    layers: dict[str, Any] = {
        "scale_shift_table": ParamSpec((L, 6, d), ("layers", None, "norm"), "table"),
        "self_attn": attention(),
        "cross_attn": attention(),
        "mlp": {
            "up": {"kernel": ParamSpec((L, d, I), ("layers", "embed", "mlp"), "normal"),
                   "bias": ParamSpec((L, I), ("layers", "mlp"), "zeros")},
            "down": {"kernel": ParamSpec((L, I, d), ("layers", "mlp", "embed"), "normal"),
                     "bias": ParamSpec((L, d), ("layers", "embed"), "zeros")},
        },
    }
    if cfg.cross_attn_norm:
        layers["cross_norm"] = {"scale": ParamSpec((L, d), ("layers", "norm"), "ones"),
                                "bias": ParamSpec((L, d), ("layers", "norm"), "zeros")}
    return {
        "patch_embed": {"kernel": ParamSpec((C, pt, ph, pw, d), (None, None, None, None, "embed"), "normal"),
                        "bias": ParamSpec((d,), ("embed",), "zeros")},
        "time_embed": {"fc1": linear(cfg.freq_dim, d, None, "embed"), "fc2": linear(d, d, "embed", "mlp")},
        "time_proj": {"kernel": ParamSpec((d, 6, d), ("embed", None, "mlp"), "normal"),
                      "bias": ParamSpec((6, d), (None, "mlp"), "zeros")},
        "text_embed": {"fc1": linear(cfg.text_dim, d, None, "embed"), "fc2": linear(d, d, "embed", "mlp")},
        "layers": layers,
        "out": {
            "scale_shift_table": ParamSpec((2, d), (None, "norm"), "table"),
            "proj": {"kernel": ParamSpec((d, pt, ph, pw, Co), ("embed", None, None, None, None), "normal"),
                     "bias": ParamSpec((pt, ph, pw, Co), (None, None, None, None), "zeros")},
        },
    }


def _is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


SelfAttention = Callable[[jax.Array, jax.Array, jax.Array, int], jax.Array]


# Up to this many random values, init draws them in one call (fast to compile); beyond, one key per leaf (no
# full-size temporary vector when a large model is initialised straight into a sharded layout).
_ONE_DRAW_MAX = 1 << 26


@functools.partial(jax.jit, static_argnums=0)
def _init_params(model: "VideoDiT", rng: jax.Array) -> dict:
    specs = param_specs(model.config)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    pdt = model.param_dtype
    std = {"normal": 0.02, "table": model.config.inner_dim ** -0.5}
    sizes = [math.prod(s.shape) if s.init in std else 0 for s in leaves]
    one_draw = sum(sizes) <= _ONE_DRAW_MAX
    if one_draw:
        z = jax.random.normal(rng, (sum(sizes),), _F32)
    keys = [None] * len(leaves) if one_draw else list(jax.random.split(rng, len(leaves)))
    out, start = [], 0
    for spec, size, key in zip(leaves, sizes, keys):
        if spec.init == "ones":
            out.append(jnp.ones(spec.shape, pdt))
        elif spec.init == "zeros":
            out.append(jnp.zeros(spec.shape, pdt))
        else:
            draw = z[start : start + size].reshape(spec.shape) if one_draw else jax.random.normal(key, spec.shape)
            out.append((std[spec.init] * draw).astype(pdt))
        start += size
    return jax.tree.unflatten(treedef, out)


@dataclasses.dataclass(frozen=True)
class VideoDiT:
    """The text-to-video DiT. Hashable: pass it as a static argument to ``jax.jit``."""

    config: VDiTConfig

    @property
    def dtype(self):
        return _DTYPES[self.config.dtype]

    @property
    def param_dtype(self):
        return _DTYPES[self.config.param_dtype]

    def init(self, rng: jax.Array) -> dict:
        """Random parameters (jitted): kernels ``N(0, 0.02)``, biases 0, norm scales 1, scale-shift tables
        ``N(0, 1) / sqrt(d)`` (Wan's)."""
        return _init_params(self, rng)

    def param_axes(self) -> dict:
        """Logical axis names, a pytree like ``init``'s output with a tuple of names per leaf."""
        return jax.tree.map(lambda s: s.axes, param_specs(self.config), is_leaf=_is_spec)

    def token_grid(self, latent_shape) -> tuple[int, int, int]:
        """``(T, Hp, Wp)`` video tokens along frames, rows and columns for latents of shape ``[B, C, F, H, W]``
        (``N = T * Hp * Wp`` tokens, frame-major, ``Hp * Wp`` per frame)."""
        shape = tuple(int(s) for s in latent_shape)
        if len(shape) != 5:
            raise ValueError(f"latents: expected shape [batch, channels, frames, height, width], got {shape}")
        grid = []
        for name, size, p in zip(("frames", "height", "width"), shape[2:], self.config.patch_size):
            if size <= 0 or size % p:
                raise ValueError(f"latents: {name} must be a positive multiple of the patch size "
                                 f"patch_size={self.config.patch_size} along it ({p}), got {size}")
            grid.append(size // p)
        return tuple(grid)

    # ---- forward -----------------------------------------------------------------------------------------------

    def apply(
        self,
        params: dict,
        latents: jax.Array,
        timesteps: jax.Array,
        text_embeds: jax.Array,
        *,
        self_attention: Optional[SelfAttention] = None,
        return_attention_outputs: bool = False,
    ) -> VDiTOutput:
        """The prediction for noisy ``latents``.

        Args:
          params: from ``init`` or ``jaxeff.checkpoint.diffusers_wan.load_wan_transformer``.
          latents: float ``[B, C, F, H, W]`` (diffusers' layout); F/H/W multiples of ``patch_size``.
          timesteps: ``[B]`` (or a scalar, broadcast), the diffusion timestep as Wan takes it (e.g. ``999.``).
          text_embeds: ``[B, L, text_dim]`` text-encoder states.
          self_attention: the hook ``(q, k, v, layer_index) -> out``, all ``[B, heads, N, head_dim]`` (see the
            module docstring); None: :func:`dense_self_attention`.
          return_attention_outputs: also return each layer's self-attention output ``[L, B, N, heads*head_dim]``
            (before the output projection).
        """
        cfg = self.config
        latents = jnp.asarray(latents)
        if latents.ndim != 5:
            raise ValueError(f"latents: expected float [batch, channels, frames, height, width], got shape "
                             f"{tuple(latents.shape)}")
        if not jnp.issubdtype(latents.dtype, jnp.floating):
            raise TypeError(f"latents: expected a floating dtype, got {latents.dtype}")
        b, c = latents.shape[:2]
        if c != cfg.in_channels:
            raise ValueError(f"latents: expected in_channels={cfg.in_channels} channels (axis 1), got {c}")
        grid = self.token_grid(latents.shape)
        if max(grid) > cfg.rope_max_seq_len:
            raise ValueError(f"latents: token grid (frames, rows, columns) = {grid} exceeds "
                             f"rope_max_seq_len={cfg.rope_max_seq_len} along an axis")
        timesteps = jnp.asarray(timesteps)
        if timesteps.ndim == 0:
            timesteps = jnp.broadcast_to(timesteps, (b,))
        if timesteps.shape != (b,):
            raise ValueError(f"timesteps: expected shape [batch]=({b},) or a scalar, got {tuple(timesteps.shape)}")
        text_embeds = jnp.asarray(text_embeds)
        if text_embeds.ndim != 3 or text_embeds.shape[0] != b or text_embeds.shape[2] != cfg.text_dim:
            raise ValueError(f"text_embeds: expected [batch={b}, length, text_dim={cfg.text_dim}], got shape "
                             f"{tuple(text_embeds.shape)}")

        dt = self.dtype
        x = _patch_embed(params["patch_embed"], latents.astype(dt), cfg.patch_size)  # [B, N, d]
        x = shd.constrain(x, ("batch", "length", "embed"))
        temb = _time_embed(params["time_embed"], timesteps, cfg.freq_dim)  # [B, d] float32
        mod = _linear(jax.nn.silu(temb.astype(dt)), params["time_proj"], "bd,dse->bse").astype(_F32)  # [B, 6, d]
        h = _linear(text_embeds.astype(dt), params["text_embed"]["fc1"], "bld,de->ble")
        context = _linear(jax.nn.gelu(h, approximate=True), params["text_embed"]["fc2"], "bld,de->ble")
        context = shd.constrain(context, ("batch", "length", "embed"))
        cos, sin = (jnp.asarray(a) for a in rope_tables(cfg, grid))  # [N, D/2]

        attn_outputs = []
        for layer in range(cfg.num_layers):
            lp = jax.tree.map(lambda a: a[layer], params["layers"])
            fn = functools.partial(_block, cfg, layer_index=layer, self_attention=self_attention)
            if cfg.remat:
                fn = jax.checkpoint(fn)
            x, a = fn(lp, x, context, mod, cos, sin)
            if return_attention_outputs:
                attn_outputs.append(a)

        out = params["out"]
        shift, scale = jnp.split(out["scale_shift_table"].astype(_F32)[None] + temb.astype(dt)[:, None], 2, axis=1)
        y = (_layer_norm(x, cfg.eps) * (1 + scale) + shift).astype(dt)
        y = _linear(y, out["proj"], "bnd,dijkc->bnijkc")  # [B, N, pt, ph, pw, C_out]
        sample = _unpatchify(y, grid).astype(_F32)
        return VDiTOutput(sample, jnp.stack(attn_outputs) if return_attention_outputs else None)

    __call__ = apply


# ---- components -----------------------------------------------------------------------------------------------


def dense_self_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Softmax attention, q ``[B, H, N, D]``, k/v ``[B, H, S, D]`` -> ``[B, H, N, D]`` in ``q.dtype`` (scale
    ``D ** -0.5``, float32 scores and softmax)."""
    s = jnp.einsum("bhnd,bhsd->bhns", q, k.astype(q.dtype), preferred_element_type=_F32) * (q.shape[-1] ** -0.5)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhns,bhsd->bhnd", p.astype(q.dtype), v.astype(q.dtype)).astype(q.dtype)


def timestep_embedding(timesteps: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding ``[B, dim]`` float32 of ``timesteps [B]``: ``[cos(t w_i), sin(t w_i)]`` with
    ``w_i = max_period ** (-i / (dim // 2))`` (cos half first; a zero column appended when ``dim`` is odd)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=_F32) / half)
    args = timesteps.astype(_F32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def rope_tables(cfg: VDiTConfig, grid: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Wan's 3D RoPE: cos/sin ``[N, head_dim // 2]`` float32 (one angle per rotated pair) for the frame-major token
    grid ``(T, Hp, Wp)``. The pairs are the frame channels, then the row, then the column channels; the angles are
    computed in float64 as Wan does."""
    axes = []
    for dim, n, axis in zip(cfg.rope_split, grid, range(3)):
        inv = 1.0 / (ROPE_THETA ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
        ang = np.outer(np.arange(n, dtype=np.float64), inv)  # [n, dim/2]
        shape = [1, 1, 1, dim // 2]
        shape[axis] = n
        axes.append(np.broadcast_to(ang.reshape(shape), tuple(grid) + (dim // 2,)))
    ang = np.concatenate(axes, axis=-1).reshape(-1, cfg.attention_head_dim // 2)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def apply_rope_pairs(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates interleaved pairs ``(x[2i], x[2i+1])`` of ``x [B, N, H, D]`` by the angles of ``cos``/``sin``
    ``[N, D/2]`` (complex multiplication), in float32; returns ``x.dtype``."""
    x32 = x.astype(_F32).reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
    x1, x2 = x32[..., 0], x32[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def _linear(x: jax.Array, p: Mapping, spec: str) -> jax.Array:
    y = jnp.einsum(spec, x, p["kernel"].astype(x.dtype))
    return y + p["bias"].astype(x.dtype)


def _layer_norm(x: jax.Array, eps: float, scale=None, bias=None) -> jax.Array:
    """LayerNorm over the last axis in float32 (returns float32)."""
    x32 = x.astype(_F32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    if scale is not None:
        y = y * scale.astype(_F32)
    if bias is not None:
        y = y + bias.astype(_F32)
    return y


def _rms_norm_heads(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm of ``x [B, N, H, D]`` over all heads together (``H * D`` channels), in float32."""
    x32 = x.astype(_F32)
    ms = jnp.mean(jnp.square(x32), axis=(-2, -1), keepdims=True)
    return (x32 * jax.lax.rsqrt(ms + eps) * scale.astype(_F32)).astype(x.dtype)


def _patch_embed(p: Mapping, latents: jax.Array, patch) -> jax.Array:
    """``[B, C, F, H, W] -> [B, N, d]`` (Conv3d with kernel = stride = patch; tokens frame-major)."""
    b, c, f, h, w = latents.shape
    pt, ph, pw = patch
    x = latents.reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw)
    y = jnp.einsum("bcxiyjzk,cijkd->bxyzd", x, p["kernel"].astype(x.dtype)) + p["bias"].astype(x.dtype)
    return y.reshape(b, -1, y.shape[-1])


def _unpatchify(y: jax.Array, grid) -> jax.Array:
    """``[B, N, pt, ph, pw, C] -> [B, C, T*pt, Hp*ph, Wp*pw]``."""
    b, _, pt, ph, pw, c = y.shape
    t, hp, wp = grid
    y = y.reshape(b, t, hp, wp, pt, ph, pw, c).transpose(0, 7, 1, 4, 2, 5, 3, 6)
    return y.reshape(b, c, t * pt, hp * ph, wp * pw)


def _time_embed(p: Mapping, timesteps: jax.Array, freq_dim: int) -> jax.Array:
    """``temb [B, d]`` float32 (Wan keeps the time embedder in float32)."""
    e = timestep_embedding(timesteps, freq_dim)
    fc1 = {k: v.astype(_F32) for k, v in p["fc1"].items()}
    fc2 = {k: v.astype(_F32) for k, v in p["fc2"].items()}
    return _linear(jax.nn.silu(_linear(e, fc1, "bf,fd->bd")), fc2, "bd,de->be")


def _heads(x: jax.Array, p: Mapping) -> jax.Array:
    """``[B, N, d] -> [B, N, H, D]``."""
    return jnp.einsum("bnd,dhk->bnhk", x, p["kernel"].astype(x.dtype)) + p["bias"].astype(x.dtype)


def _to_bhnd(x: jax.Array) -> jax.Array:
    return shd.constrain(x.transpose(0, 2, 1, 3), ("batch", "q_heads", "length", "head_dim"))


def _out_proj(o: jax.Array, p: Mapping) -> jax.Array:
    """``[B, H, N, D] -> [B, N, d]``."""
    return jnp.einsum("bhnk,hkd->bnd", o, p["kernel"].astype(o.dtype)) + p["bias"].astype(o.dtype)


def _block(cfg: VDiTConfig, lp: Mapping, x: jax.Array, context: jax.Array, mod: jax.Array, cos: jax.Array,
           sin: jax.Array, *, layer_index: int, self_attention: Optional[SelfAttention]):
    """One Wan block. x ``[B, N, d]``, context ``[B, L, d]`` (compute dtype), mod ``[B, 6, d]`` float32.
    Returns ``(x, self-attention output [B, N, H*D] before its projection)``."""
    dt = x.dtype
    eps = cfg.eps
    m = lp["scale_shift_table"].astype(_F32)[None] + mod
    shift, scale, gate, c_shift, c_scale, c_gate = (m[:, i : i + 1] for i in range(6))

    # self-attention
    a = lp["self_attn"]
    h = (_layer_norm(x, eps) * (1 + scale) + shift).astype(dt)
    q, k, v = _heads(h, a["q"]), _heads(h, a["k"]), _heads(h, a["v"])
    if cfg.qk_norm is not None:
        q = _rms_norm_heads(q, a["q_norm"]["scale"], eps)
        k = _rms_norm_heads(k, a["k_norm"]["scale"], eps)
    q, k = apply_rope_pairs(q, cos, sin), apply_rope_pairs(k, cos, sin)
    q, k, v = _to_bhnd(q), _to_bhnd(k), _to_bhnd(v)
    if self_attention is None:
        o = dense_self_attention(q, k, v)
    else:
        o = self_attention(q, k, v, layer_index)
        if tuple(o.shape) != tuple(q.shape):
            raise ValueError(f"self_attention hook: expected an output of shape [B, heads, N, head_dim]="
                             f"{tuple(q.shape)} at layer {layer_index}, got {tuple(o.shape)}")
    o = o.astype(dt)
    b, n = x.shape[:2]
    attn_out = o.transpose(0, 2, 1, 3).reshape(b, n, -1)
    x = (x.astype(_F32) + _out_proj(o, a["o"]).astype(_F32) * gate).astype(dt)
    x = shd.constrain(x, ("batch", "length", "embed"))

    # cross-attention to the text
    a = lp["cross_attn"]
    if cfg.cross_attn_norm:
        h = _layer_norm(x, eps, lp["cross_norm"]["scale"], lp["cross_norm"]["bias"]).astype(dt)
    else:
        h = x
    q, k, v = _heads(h, a["q"]), _heads(context, a["k"]), _heads(context, a["v"])
    if cfg.qk_norm is not None:
        q = _rms_norm_heads(q, a["q_norm"]["scale"], eps)
        k = _rms_norm_heads(k, a["k_norm"]["scale"], eps)
    o = dense_self_attention(_to_bhnd(q), _to_bhnd(k), _to_bhnd(v))
    x = x + _out_proj(o, a["o"]).astype(dt)
    x = shd.constrain(x, ("batch", "length", "embed"))

    # feed-forward
    mp = lp["mlp"]
    h = (_layer_norm(x, eps) * (1 + c_scale) + c_shift).astype(dt)
    h = jax.nn.gelu(_linear(h, mp["up"], "bnd,di->bni"), approximate=True)
    h = shd.constrain(h, ("batch", "length", "mlp"))
    y = _linear(h, mp["down"], "bni,id->bnd")
    x = (x.astype(_F32) + y.astype(_F32) * c_gate).astype(dt)
    x = shd.constrain(x, ("batch", "length", "embed"))
    return x, attn_out


# ---- classifier-free guidance --------------------------------------------------------------------------------


def guided_sample_prediction(
    model: VideoDiT,
    params: dict,
    latents: jax.Array,
    timesteps: jax.Array,
    text_embeds: jax.Array,
    null_text_embeds: jax.Array,
    guidance_scale: float,
    **kw,
) -> jax.Array:
    """Classifier-free guidance: ``uncond + s * (cond - uncond)`` ``[B, C_out, F, H, W]`` float32, with the
    conditional and unconditional passes run as one batch of ``2B``.

    ``null_text_embeds``: ``[B, L, text_dim]`` or ``[1, L, text_dim]`` (broadcast), the same length ``L`` as
    ``text_embeds`` (e.g. the encoded empty prompt, or zeros). ``kw`` goes to :meth:`VideoDiT.apply`
    (``self_attention``)."""
    if "return_attention_outputs" in kw:
        raise TypeError("guided_sample_prediction returns the guided sample only; call model.apply for "
                        "attention outputs")
    text_embeds = jnp.asarray(text_embeds)
    null_text_embeds = jnp.asarray(null_text_embeds)
    if text_embeds.ndim != 3:
        raise ValueError(f"text_embeds: expected [batch, length, text_dim], got shape {tuple(text_embeds.shape)}")
    b = text_embeds.shape[0]
    if null_text_embeds.ndim != 3 or null_text_embeds.shape[0] not in (1, b) \
            or null_text_embeds.shape[1:] != text_embeds.shape[1:]:
        raise ValueError(f"null_text_embeds: expected [{b} or 1, {text_embeds.shape[1]}, {text_embeds.shape[2]}] "
                         f"(the shape of text_embeds), got {tuple(null_text_embeds.shape)}")
    null_text_embeds = jnp.broadcast_to(null_text_embeds, text_embeds.shape).astype(text_embeds.dtype)
    latents = jnp.asarray(latents)
    timesteps = jnp.asarray(timesteps)
    if timesteps.ndim == 0:
        timesteps = jnp.broadcast_to(timesteps, (latents.shape[0],))
    out = model.apply(params, jnp.concatenate([latents, latents]), jnp.concatenate([timesteps, timesteps]),
                      jnp.concatenate([text_embeds, null_text_embeds]), **kw).sample
    cond, uncond = jnp.split(out, 2, axis=0)
    return uncond + guidance_scale * (cond - uncond)
