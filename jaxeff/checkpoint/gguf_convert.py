"""GGUF (llama.cpp) -> Hugging Face directory (``config.json``, float32 ``model.safetensors``, tokenizer files).

Torch-free: tensors are read with ``gguf.GGUFReader`` and dequantized with ``gguf.quants.dequantize`` (numpy),
the config is written from the GGUF metadata through :func:`jaxeff.checkpoint.hf_config.config_to_hf`, and the
tokenizer is rebuilt from the vocabulary and merges stored in the metadata with the ``tokenizers``-backed classes of
transformers. The result loads with :func:`jaxeff.load_pretrained` and with transformers' ``from_pretrained``.

Two llama.cpp conventions are undone:

* Q/K row order. ggml's RoPE rotates *adjacent* pairs, Hugging Face's rotates the two *halves* of a head, so
  llama.cpp's converter reorders each head's rows of ``attn_q``/``attn_k`` from ``[x_0..x_{D/2-1}, y_0..y_{D/2-1}]``
  to ``[x_0, y_0, x_1, y_1, ...]``. :func:`unpermute_rope_rows` puts them back.
* Names (``blk.{i}.attn_q.weight`` -> ``model.layers.{i}.self_attn.q_proj.weight``, see ``_NAMES``); a missing
  ``output.weight`` means tied embeddings.

Scope: ``general.architecture == "llama"`` (Llama, SmolLM2) with a byte-level BPE vocabulary (``tokenizer.ggml.model
== "gpt2"``) split by the GPT-2 pattern. Anything else (other architectures, RoPE scaling stored as a
``rope_freqs`` tensor, other pre-tokenizers) raises rather than producing a subtly different model.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any, Callable, Optional

import numpy as np

from jaxeff.checkpoint.hf import SINGLE_FILE, _hf_shape, _leaf_specs, hf_tensor_map
from jaxeff.checkpoint.hf_config import CheckpointError, config_to_hf
from jaxeff.models.config import LMConfig, RopeScaling

_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")

# Pre-tokenizer names llama.cpp gives vocabularies that split text with GPT-2's own pattern.
_GPT2_SPLIT_PRE = ("gpt2", "smollm")
_CONTROL, _USER_DEFINED = 3, 4


def hf_name(gguf_name: str) -> str:
    """The Hugging Face tensor name of a llama-architecture GGUF tensor."""
    if gguf_name in _NAMES:
        return _NAMES[gguf_name]
    m = _BLOCK.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    raise CheckpointError(f"GGUF tensor {gguf_name!r} has no Hugging Face Llama equivalent")


def unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row interleaving. ``w``: ``[num_heads * D, in]`` (or ``[num_heads * D]``)."""
    rows = w.shape[0]
    head = rows // num_heads
    return w.reshape(num_heads, head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _Meta:
    def __init__(self, reader, path):
        self.fields = reader.fields
        self.path = path

    def get(self, key: str, default: Any = KeyError):
        f = self.fields.get(key)
        if f is None:
            if default is KeyError:
                raise CheckpointError(f"GGUF file {str(self.path)!r}: required metadata {key!r} is missing")
            return default
        return f.contents()


def gguf_config(meta: _Meta, tensor_names: set) -> tuple[LMConfig, dict]:
    """``(LMConfig, extra config.json keys)`` from a llama-architecture GGUF's metadata."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"GGUF file {str(meta.path)!r}: architecture {arch!r} is not supported (only 'llama')")
    if "rope_freqs.weight" in tensor_names:
        raise CheckpointError(f"GGUF file {str(meta.path)!r}: RoPE frequency factors (rope_freqs) are not supported")
    heads = int(meta.get("llama.attention.head_count"))
    hidden = int(meta.get("llama.embedding_length"))
    head_dim = int(meta.get("llama.attention.key_length", hidden // heads))
    rope_dim = int(meta.get("llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise CheckpointError(f"GGUF file {str(meta.path)!r}: partial RoPE ({rope_dim} of {head_dim}) is not supported")
    scaling_type = meta.get("llama.rope.scaling.type", "none")
    if scaling_type == "none":
        scaling = RopeScaling()
    elif scaling_type == "linear":
        scaling = RopeScaling(rope_type="linear", factor=float(meta.get("llama.rope.scaling.factor")))
    else:
        raise CheckpointError(
            f"GGUF file {str(meta.path)!r}: RoPE scaling type {scaling_type!r} is not supported (none, linear)"
        )
    tokens = meta.get("tokenizer.ggml.tokens", None)
    vocab = meta.get("llama.vocab_size", None)
    if vocab is None:
        if tokens is None:
            raise CheckpointError(f"GGUF file {str(meta.path)!r}: neither llama.vocab_size nor a vocabulary is stored")
        vocab = len(tokens)
    cfg = LMConfig(
        architecture="llama",
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(meta.get("llama.feed_forward_length")),
        num_layers=int(meta.get("llama.block_count")),
        num_heads=heads,
        num_kv_heads=int(meta.get("llama.attention.head_count_kv", heads)),
        head_dim=None if head_dim * heads == hidden else head_dim,
        # The float32 stored in the file, widened exactly (what transformers' GGUF loader uses as well).
        rms_norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(meta.get("llama.context_length", 2048)),
        tie_embeddings="output.weight" not in tensor_names,
        bos_token_id=_opt_int(meta.get("tokenizer.ggml.bos_token_id", None)),
        eos_token_id=_opt_int(meta.get("tokenizer.ggml.eos_token_id", None)),
    )
    extra = {}
    for key, name in (("pad_token_id", "padding_token_id"), ("unk_token_id", "unknown_token_id")):
        value = _opt_int(meta.get(f"tokenizer.ggml.{name}", None))
        if value is not None:
            extra[key] = value
    return cfg, extra


def _opt_int(v) -> Optional[int]:
    return None if v is None else int(v)


def gguf_tokenizer(meta: _Meta):
    """A ``transformers`` fast tokenizer rebuilt from the vocabulary, merges and special ids in the metadata."""
    from tokenizers import AddedToken
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import GPT2Tokenizer, TokenizersBackend

    where = f"GGUF file {str(meta.path)!r}"
    model = meta.get("tokenizer.ggml.model")
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    if model != "gpt2":
        raise CheckpointError(f"{where}: tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2')")
    if pre not in _GPT2_SPLIT_PRE:
        raise CheckpointError(
            f"{where}: pre-tokenizer {pre!r} is not supported (supported: {', '.join(_GPT2_SPLIT_PRE)})"
        )
    for flag in ("add_bos_token", "add_eos_token"):
        if meta.get(f"tokenizer.ggml.{flag}", False):
            raise CheckpointError(f"{where}: tokenizer.ggml.{flag}=true is not supported")
    tokens = list(meta.get("tokenizer.ggml.tokens"))
    merges = list(meta.get("tokenizer.ggml.merges"))
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    # A byte-level vocabulary spells every token in the 256-character byte alphabet; anything else would need a
    # respelling step whose result we could not check here.
    alphabet = set(ByteLevel.alphabet())
    odd = [t for t in tokens if not set(t) <= alphabet]
    if odd:
        raise CheckpointError(
            f"{where}: {len(odd)} token(s) are not spelled in the byte-level alphabet, e.g. {odd[0]!r}"
        )
    base = GPT2Tokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in merges])
    control = [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types) if k == _CONTROL]
    if control:
        base.add_special_tokens({"additional_special_tokens": control}, replace_extra_special_tokens=False)
    user = [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
    if user:
        base.add_tokens(user)

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}", None)
        return None if i is None else tokens[int(i)]

    kwargs = dict(
        tokenizer_object=base.backend_tokenizer,
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"),
    )
    template = meta.get("tokenizer.chat_template", None)
    if template is not None:
        kwargs["chat_template"] = template
    return TokenizersBackend(**{k: v for k, v in kwargs.items() if v is not None})


def convert_gguf(
    gguf_path: str | pathlib.Path,
    out_dir: str | pathlib.Path,
    *,
    progress: Optional[Callable[[str], None]] = None,
) -> pathlib.Path:
    """Writes the Hugging Face directory for a llama-architecture GGUF file into ``out_dir`` (created).

    Weights are stored as float32: the exact dequantized values (every quantized value is ``scale * q + min`` with
    float16 scales, representable in float32).
    """
    import gguf
    from gguf.quants import dequantize

    say = progress or (lambda msg: None)
    gguf_path = pathlib.Path(gguf_path)
    if not gguf_path.is_file():
        raise CheckpointError(f"GGUF file {str(gguf_path)!r} does not exist")
    say(f"reading {gguf_path.name}")
    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except Exception as e:  # the reader raises plain ValueError/struct errors on a damaged file
        raise CheckpointError(f"GGUF file {str(gguf_path)!r} cannot be read: {e}") from e
    meta = _Meta(reader, gguf_path)
    cfg, extra = gguf_config(meta, {t.name for t in reader.tensors})
    table = hf_tensor_map(cfg)
    specs = _leaf_specs(cfg)

    say(f"dequantizing {len(reader.tensors)} tensors to float32")
    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name not in table:
            raise CheckpointError(f"GGUF tensor {t.name!r} ({name}) is not part of the model its metadata describes")
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if t.name.endswith("attn_q.weight"):
            w = unpermute_rope_rows(w, cfg.num_heads)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_rope_rows(w, cfg.num_kv_heads)
        tm = table[name]
        want = _hf_shape(tm.kind, specs[tm.path].shape[len(tm.index) :])
        if tuple(w.shape) != want:
            raise CheckpointError(f"GGUF tensor {t.name!r}: expected shape {list(want)}, got {list(w.shape)}")
        tensors[name] = np.ascontiguousarray(w)
    missing = sorted(set(table) - set(tensors))
    if missing:
        raise CheckpointError(f"GGUF file {str(gguf_path)!r} lacks tensor(s) {missing[:8]}")

    from safetensors.numpy import save_file

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say(f"writing {SINGLE_FILE} ({sum(a.nbytes for a in tensors.values()) / 1e6:.0f} MB)")
    save_file({k: tensors[k] for k in table}, str(out / SINGLE_FILE), metadata={"format": "pt"})
    with open(out / "config.json", "w") as f:
        json.dump({**config_to_hf(cfg), **extra}, f, indent=2, sort_keys=True)
        f.write("\n")
    say("writing the tokenizer")
    gguf_tokenizer(meta).save_pretrained(str(out))
    return out
