"""Checkpoint import/export: Hugging Face ``config.json`` + safetensors (``hf``), GGUF conversion (``gguf_convert``)."""

from jaxeff.checkpoint.gguf_convert import convert_gguf
from jaxeff.checkpoint.hf import (
    HARMLESS_EXTRA,
    TensorMap,
    hf_tensor_map,
    load_params,
    load_pretrained,
    load_tokenizer,
    parse_size,
    save_pretrained,
)
from jaxeff.checkpoint.hf_config import (
    SUPPORTED_MODEL_TYPES,
    CheckpointError,
    config_from_hf,
    config_to_hf,
    hf_eos_token_ids,
    read_hf_config,
    read_hf_config_dict,
)

__all__ = [
    "HARMLESS_EXTRA",
    "SUPPORTED_MODEL_TYPES",
    "CheckpointError",
    "TensorMap",
    "config_from_hf",
    "config_to_hf",
    "convert_gguf",
    "hf_eos_token_ids",
    "hf_tensor_map",
    "load_params",
    "load_pretrained",
    "load_tokenizer",
    "parse_size",
    "read_hf_config",
    "read_hf_config_dict",
    "save_pretrained",
]
