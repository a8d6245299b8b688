"""Parity with transformers (torch, float32) on tiny random checkpoints written by transformers' own
``save_pretrained``: full-forward logits, batched prefill of prompts of different lengths plus step-by-step decoding
through the KV cache, and our export loading back into transformers unchanged.

Cases: Llama (GQA); Llama with Llama-3.1 RoPE scaling, tied embeddings and every bias, loaded with
``scan_layers=False``; Mistral with a sliding window (4) shorter than the sequences and a head size that is not
hidden/heads; Qwen2 (q/k/v bias) without and with its sliding window; Mixtral (4 experts, top-2, Hub per-expert file
layout). Norm scales and biases are randomised (transformers initialises them to ones/zeros, which would hide a
swapped pair).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxeff  # noqa: E402

TOL = 1e-4
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.08)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
# name -> (transformers class prefix, config kwargs, jaxeff load overrides)
CASES = {
    "llama": ("Llama", {}, {}),
    "llama3_tied_bias": ("Llama", dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True, attention_bias=True,
                                       mlp_bias=True), dict(scan_layers=False)),
    "mistral_window": ("Mistral", dict(sliding_window=4, head_dim=32), {}),
    "qwen2": ("Qwen2", {}, {}),
    "qwen2_window": ("Qwen2", dict(use_sliding_window=True, sliding_window=5, max_window_layers=0), {}),
    "mixtral": ("Mixtral", dict(num_local_experts=4, num_experts_per_tok=2), dict(moe_impl="ragged")),
}


@dataclasses.dataclass
class Pair:
    name: str
    hf: object
    model: jaxeff.DecoderLM
    params: dict
    path: object


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    name = request.param
    prefix, extra, overrides = CASES[name]
    torch.manual_seed(sorted(CASES).index(name))
    cfg = getattr(transformers, f"{prefix}Config")(**COMMON, **extra)
    hf = getattr(transformers, f"{prefix}ForCausalLM")(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif n.endswith(".bias"):
                p.normal_(0, 0.2)
    path = tmp_path_factory.mktemp(name)
    hf.save_pretrained(path)
    model, params = jaxeff.load_pretrained(path, **overrides)
    return Pair(name, hf, model, params, path)


def _hf_logits(hf, tokens) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def test_config_read_as_transformers_reads_it(pair):
    c, hc = pair.model.config, pair.hf.config
    assert c.architecture == hc.model_type
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_size) == (
        hc.num_hidden_layers, hc.num_attention_heads, hc.num_key_value_heads,
        getattr(hc, "head_dim", None) or hc.hidden_size // hc.num_attention_heads)
    assert c.tie_embeddings == hc.tie_word_embeddings
    want_window = {"mistral_window": 4, "qwen2_window": 5}.get(pair.name)
    assert c.sliding_window == want_window


def test_full_forward_logits(pair):
    tokens = np.random.default_rng(0).integers(0, 128, (2, 13))
    ref = _hf_logits(pair.hf, tokens)
    ours = np.asarray(jax.jit(pair.model.apply)(pair.params, tokens))
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= TOL


def test_batched_prefill_and_cached_decode(pair):
    """Two prompts of lengths 9 and 4 are prefilled together (right padded), then 5 tokens each are fed one step at
    a time through the cache. Each step's logits must equal transformers' logits at that position of the whole
    sequence run on its own (no padding)."""
    model, params = pair.model, pair.params
    rng = np.random.default_rng(1)
    lengths = np.array([9, 4], np.int32)
    steps = 5
    seqs = [rng.integers(0, 128, n + steps) for n in lengths]
    refs = [_hf_logits(pair.hf, s[None])[0] for s in seqs]

    prompt = np.zeros((2, lengths.max()), np.int32)
    for i, n in enumerate(lengths):
        prompt[i, :n] = seqs[i][:n]
    mask = np.arange(prompt.shape[1])[None] < lengths[:, None]

    @jax.jit
    def prefill(params, tokens, mask, lengths):
        cache = model.init_cache(batch=2, capacity=32)
        out = model.forward(params, tokens, cache=cache, attention_mask=mask, logits_at=lengths - 1)
        return out.logits[:, 0], out.cache

    @jax.jit
    def decode(params, token, cache):
        out = model.forward(params, token[:, None], cache=cache)
        return out.logits[:, 0], out.cache

    logits, cache = prefill(params, prompt, mask, lengths)
    worst = 0.0
    for s in range(steps + 1):
        for i, n in enumerate(lengths):
            worst = max(worst, float(np.abs(np.asarray(logits[i]) - refs[i][n - 1 + s]).max()))
        if s == steps:
            break
        token = jnp.asarray([seqs[i][n + s] for i, n in enumerate(lengths)], jnp.int32)
        logits, cache = decode(params, token, cache)
    assert np.asarray(cache.next_pos).tolist() == (lengths + steps).tolist()
    assert worst <= TOL


def test_export_loads_back_into_transformers(pair, tmp_path):
    """Our ``save_pretrained`` of the imported parameters gives transformers the very same model: identical
    weights (every tensor, bit for bit) and identical logits."""
    jaxeff.save_pretrained(pair.model, pair.params, tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()  # sharded: exercises the index as well
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(back) is type(pair.hf)
    want, got = pair.hf.state_dict(), back.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    tokens = np.random.default_rng(2).integers(0, 128, (1, 11))
    np.testing.assert_array_equal(_hf_logits(back, tokens), _hf_logits(pair.hf, tokens))
