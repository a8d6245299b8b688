"""jaxeff: efficiency methods for LLMs and diffusion models in JAX/Flax."""

from jaxeff.cache import KVCache, LayerKV
from jaxeff.checkpoint import CheckpointError, load_pretrained, load_tokenizer, save_pretrained
from jaxeff.generate import SamplingConfig, generate, generate_stream
from jaxeff.models.config import LMConfig, RopeScaling
from jaxeff.models.hooks import Hooks, LayerContext, Method, RouterOutput
from jaxeff.models.lm import DecoderLM, LMOutput

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "DecoderLM",
    "Hooks",
    "KVCache",
    "LMConfig",
    "LMOutput",
    "LayerContext",
    "LayerKV",
    "Method",
    "RopeScaling",
    "RouterOutput",
    "SamplingConfig",
    "generate",
    "generate_stream",
    "load_pretrained",
    "load_tokenizer",
    "save_pretrained",
]
