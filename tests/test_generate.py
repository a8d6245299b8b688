"""Generation oracles: greedy ``generate`` equals a loop of full forward passes + argmax, streaming yields the same
tokens, stop tokens end one sequence while the others go on, and the samplers draw from the distributions they
claim (checked on many samples with a fixed seed)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import tiny_model

from jaxeff import DecoderLM, LMConfig, SamplingConfig, generate, generate_stream
from jaxeff.generate import prepare_prompts, sample_logits

FAST = {"xla_backend_optimization_level": 0}  # tiny programs: LLVM optimisation only costs compile time
VOCAB = 64
MAX_NEW = 8
BUF = 32  # the naive oracle's fixed buffer length (one compiled forward for every step)


@pytest.fixture(scope="module")
def model_params():
    # std 0.3: well separated logits, so greedy choices are not decided by rounding
    return tiny_model(std=0.3)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(1)
    return [rng.integers(0, VOCAB, size=n).tolist() for n in (5, 9, 3)]


@jax.jit(static_argnums=0, compiler_options=FAST)
def _forward(model, params, tokens):
    return model.apply(params, tokens)


def naive_greedy(model, params, prompts, n_new):
    """``[B, n_new]``: each step runs the full forward pass over the whole sequence so far (no cache) and appends
    the argmax. Sequences sit right-padded in a ``[B, BUF]`` buffer; causality makes the padding irrelevant."""
    b = len(prompts)
    buf = np.zeros((b, BUF), np.int32)
    lens = np.array([len(p) for p in prompts])
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = p
    out = np.zeros((b, n_new), np.int32)
    for step in range(n_new):
        logits = np.asarray(_forward(model, params, jnp.asarray(buf)))
        nxt = logits[np.arange(b), lens - 1].argmax(-1)
        out[:, step] = nxt
        buf[np.arange(b), lens] = nxt
        lens += 1
    return out


@pytest.fixture(scope="module")
def greedy_reference(model_params, prompts):
    model, params = model_params
    return naive_greedy(model, params, prompts, MAX_NEW)


def test_greedy_generate_equals_naive_full_forward_loop(model_params, prompts, greedy_reference):
    model, params = model_params
    out, lengths = generate(model, params, prompts, max_new_tokens=MAX_NEW, stop_tokens=[], return_lengths=True)
    assert out.shape == (3, MAX_NEW) and out.dtype == np.int32
    np.testing.assert_array_equal(out, greedy_reference)
    np.testing.assert_array_equal(lengths, MAX_NEW)
    assert len({tuple(r) for r in greedy_reference}) == 3  # the prompts lead to different continuations

    # the same prompts as a padded array with lengths
    arr = np.zeros((3, 9), np.int32)
    for i, p in enumerate(prompts):
        arr[i, : len(p)] = p
    out2 = generate(model, params, arr, prompt_lengths=[len(p) for p in prompts], max_new_tokens=MAX_NEW,
                    stop_tokens=[])
    np.testing.assert_array_equal(out2, greedy_reference)


def test_generate_stream_yields_the_same_tokens(model_params, prompts, greedy_reference):
    model, params = model_params
    steps = list(generate_stream(model, params, prompts, max_new_tokens=MAX_NEW, stop_tokens=[]))
    assert len(steps) == MAX_NEW
    np.testing.assert_array_equal(np.stack(steps, axis=1), greedy_reference)


def _pick_stop_token(reference):
    """A token that ends some sequence early while another sequence runs longer (or never emits it)."""
    n = reference.shape[1]
    for tok in reference[:, : n - 2].reshape(-1):
        first = np.array([np.flatnonzero(r == tok)[0] if tok in r else n for r in reference])
        if first.min() < n - 2 and first.max() > first.min():
            return int(tok), first
    pytest.fail(f"no usable stop token in the greedy continuations {reference.tolist()}")


def test_stop_tokens_end_one_sequence_while_others_continue(model_params, prompts, greedy_reference):
    model, params = model_params
    stop, first = _pick_stop_token(greedy_reference)
    pad = -1  # out of the vocabulary: it must not be fed back into the model in a way that matters
    expected = np.full_like(greedy_reference, pad)
    expected_len = np.minimum(first + 1, MAX_NEW)  # the stop token is included and counted
    for i, n in enumerate(expected_len):
        expected[i, :n] = greedy_reference[i, :n]
    out, lengths = generate(model, params, prompts, max_new_tokens=MAX_NEW, stop_tokens=[stop], pad_id=pad,
                            return_lengths=True)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(lengths, expected_len)

    steps = np.stack(list(generate_stream(model, params, prompts, max_new_tokens=MAX_NEW, stop_tokens=[stop])), 1)
    assert steps.shape[1] == expected_len.max()  # stops once every sequence has stopped
    np.testing.assert_array_equal(steps, expected[:, : steps.shape[1]])  # -1 after the stop, like pad=-1 here


def test_default_stop_tokens_are_the_configured_eos(model_params):
    """Without ``stop_tokens``, the model's ``eos_token_id`` (if any) stops generation; ``[]`` means none."""
    from jaxeff.generate import _stop_ids

    model, _ = model_params
    with_eos = DecoderLM(dataclasses.replace(model.config, eos_token_id=7))
    assert _stop_ids(with_eos, None).tolist() == [7]
    assert 7 not in _stop_ids(with_eos, []).tolist()
    assert _stop_ids(model, None).tolist() == [-1]  # matches no token
    assert _stop_ids(with_eos, [3, 5]).tolist() == [3, 5]


def test_top_k_1_and_tiny_top_p_are_greedy(model_params, prompts, greedy_reference):
    """Streamed: the sampler compiles on its own, the model steps are shared with the greedy stream."""
    model, params = model_params
    for kw, seed in ((dict(top_k=1), 3), (dict(top_p=1e-6), 4)):
        steps = generate_stream(model, params, prompts, max_new_tokens=MAX_NEW, temperature=1.5, stop_tokens=[],
                                rng=jax.random.key(seed), **kw)
        np.testing.assert_array_equal(np.stack(list(steps), 1), greedy_reference, err_msg=str(kw))


def test_sampled_generate_equals_sampled_stream(model_params, prompts, greedy_reference):
    """Same key, same draws: the jitted loop and the streaming loop split the key identically."""
    model, params = model_params
    kw = dict(max_new_tokens=MAX_NEW, temperature=1.0, top_p=0.9, stop_tokens=[], rng=jax.random.key(5))
    out = generate(model, params, prompts, **kw)
    np.testing.assert_array_equal(np.stack(list(generate_stream(model, params, prompts, **kw)), 1), out)
    assert not np.array_equal(out, greedy_reference)  # it really sampled
    assert out.min() >= 0 and out.max() < VOCAB


def test_capacity_of_exactly_prompt_plus_new_tokens_is_enough(model_params):
    """The prompt bucket padding (20 -> 32) needs no cache slots: capacity 20 + 4 suffices."""
    model, params = model_params
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, VOCAB, size=n).tolist() for n in (20, 5, 12)]
    out = generate(model, params, prompts, max_new_tokens=4, stop_tokens=[], cache_capacity=24)
    np.testing.assert_array_equal(out, naive_greedy(model, params, prompts, 4))


# ---- samplers -----------------------------------------------------------------------------------------------


_sample = jax.jit(sample_logits, static_argnames="cfg", compiler_options=FAST)


def _chi_square(counts, probs):
    expected = counts.sum() * probs
    return float(np.sum((counts - expected) ** 2 / expected))


def test_temperature_sampling_matches_softmax():
    logits = np.array([1.0, 0.2, -0.5, 2.0, 0.0, -1.5], np.float32)
    n, temp = 20000, 0.7
    ids = np.asarray(_sample(jnp.tile(logits, (n, 1)), jax.random.key(0), SamplingConfig(temperature=temp)))
    counts = np.bincount(ids, minlength=logits.size)
    p = np.exp(logits / temp) / np.exp(logits / temp).sum()
    # 5 degrees of freedom: chi2 > 30 has probability ~1e-5 under the right distribution
    assert _chi_square(counts, p) < 30, (counts, p * n)
    p_wrong = np.exp(logits) / np.exp(logits).sum()  # temperature ignored: must be rejected by the same test
    assert _chi_square(counts, p_wrong) > 100


def test_top_k_samples_only_the_k_most_likely_in_their_proportions():
    rng = np.random.default_rng(0)
    rows, reps, k = 4, 2500, 5
    logits = rng.standard_normal((rows, 16)).astype(np.float32) * 2
    ids = np.asarray(_sample(jnp.asarray(np.repeat(logits, reps, axis=0)), jax.random.key(1),
                             SamplingConfig(temperature=1.0, top_k=k))).reshape(rows, reps)
    top = np.argsort(-logits, axis=-1)[:, :k]
    for r in range(rows):
        assert np.isin(ids[r], top[r]).all(), (r, np.setdiff1d(ids[r], top[r]))
        counts = np.array([(ids[r] == t).sum() for t in top[r]])
        p = np.exp(logits[r, top[r]]) / np.exp(logits[r, top[r]]).sum()
        assert _chi_square(counts, p) < 30, (r, counts, p * reps)  # 4 degrees of freedom


def test_top_p_keeps_the_smallest_nucleus():
    probs = np.array([0.05, 0.5, 0.15, 0.3], np.float32)
    logits = np.log(probs)
    n = 8000
    # mass of the strictly more likely tokens: 0.5 -> 0, 0.3 -> 0.5, 0.15 -> 0.8: top_p 0.7 keeps {0.5, 0.3}
    ids = np.asarray(_sample(jnp.tile(logits, (n, 1)), jax.random.key(2), SamplingConfig(temperature=1.0, top_p=0.7)))
    counts = np.bincount(ids, minlength=4)
    assert counts[0] == 0 and counts[2] == 0, counts
    assert _chi_square(counts[[1, 3]], np.array([0.5, 0.3]) / 0.8) < 25, counts  # 1 degree of freedom


# ---- bad arguments ------------------------------------------------------------------------------------------


def test_prompt_longer_than_cache_capacity_names_both_numbers(model_params):
    model, params = model_params
    prompt = [list(range(1, 21))]  # 20 tokens
    with pytest.raises(ValueError) as info:
        generate(model, params, prompt, max_new_tokens=4, cache_capacity=16)
    assert "16" in str(info.value) and "20" in str(info.value), info.value
    with pytest.raises(ValueError, match="16"):
        next(generate_stream(model, params, prompt, max_new_tokens=4, cache_capacity=16))
    with pytest.raises(ValueError, match="23"):  # fits the prompt, not the new tokens
        generate(model, params, prompt, max_new_tokens=4, cache_capacity=23)


@pytest.mark.parametrize("bad", [VOCAB, -1])
def test_out_of_vocab_prompt_raises(model_params, bad):
    model, params = model_params
    with pytest.raises(ValueError, match=rf"{bad}.*vocabulary"):
        generate(model, params, [[1, 2], [3, bad, 4]], max_new_tokens=2)
    with pytest.raises(ValueError, match="vocabulary"):
        next(generate_stream(model, params, [[3, bad]], max_new_tokens=2))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=4, temperature=-0.5), "temperature"),
        (dict(max_new_tokens=4, temperature=1.0, top_p=0.0), "top_p"),
        (dict(max_new_tokens=4, temperature=1.0, top_p=1.5), "top_p"),
        (dict(max_new_tokens=4, top_k=-1), "top_k"),
    ],
)
def test_invalid_generation_arguments_raise(model_params, kwargs, match):
    model, params = model_params
    with pytest.raises(ValueError, match=match):
        generate(model, params, [[1, 2, 3]], **kwargs)
    with pytest.raises(ValueError, match=match):
        next(generate_stream(model, params, [[1, 2, 3]], **kwargs))


def test_bad_prompt_structure_raises(model_params):
    model, params = model_params
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, params, [[1, 2], []], max_new_tokens=2)
    with pytest.raises(TypeError, match="integer"):
        generate(model, params, np.ones((2, 3), np.float32), max_new_tokens=2)


# ---- the `python -m train.generate` command line ------------------------------------------------------------

CLI_TEXTS = ["hello world, café crème brûlée", "日本語のテキスト 🙂 ok", "the quick brown fox jumps over the lazy dog",
             "user: hi\nassistant: hello!"]


def _byte_level_tokenizer():
    """A byte-level BPE (multi-byte characters span several tokens) trained on a few sentences, with a chat
    template, as a transformers fast tokenizer."""
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CLI_TEXTS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    return fast


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random Llama saved by transformers (safetensors + config.json) with its tokenizer."""
    torch = pytest.importorskip("torch")
    import jaxeff

    if not hasattr(jaxeff, "load_pretrained"):
        pytest.skip("jaxeff.load_pretrained is not available")
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _byte_level_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
        initializer_range=0.3,  # well separated logits: greedy choices do not hinge on rounding
    )
    torch.manual_seed(0)
    hf_model = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("tiny_llama")
    hf_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, hf_model, tokenizer


def _hf_greedy_text(hf_model, tokenizer, ids, n):
    """transformers' own greedy continuation (stopping at eos), decoded."""
    import torch

    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


def test_incremental_decoder_never_splits_a_character():
    from train.generate import IncrementalDecoder

    tokenizer = _byte_level_tokenizer()
    text = "日本語 🙂 café brûlée"
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode(ids[:i]) for i in range(1, len(ids)))  # some prefixes split a char
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_cli_streams_the_greedy_continuation(hf_dir, capsys):
    from train.generate import main

    path, hf_model, tokenizer = hf_dir
    prompt, n = "the quick brown", 12
    assert main(["--model", str(path), "--prompt", prompt, "--max-new-tokens", str(n)]) == 0
    out, err = capsys.readouterr()
    assert out == _hf_greedy_text(hf_model, tokenizer, tokenizer.encode(prompt), n) + "\n"
    assert len(out) > 1
    assert "compile" in err and "tokens/s" in err


def test_cli_chat_applies_the_template(hf_dir, capsys):
    from train.generate import encode_prompt, main

    path, hf_model, tokenizer = hf_dir
    ids = encode_prompt(tokenizer, "hi", chat=True)
    assert tokenizer.decode(ids) == "<s>user: hi\nassistant:"
    assert main(["--model", str(path), "--prompt", "hi", "--chat", "--max-new-tokens", "10"]) == 0
    out, _ = capsys.readouterr()
    assert out == _hf_greedy_text(hf_model, tokenizer, ids, 10) + "\n"


def test_cli_bad_arguments_fail_clearly(hf_dir, tmp_path, capsys):
    import yaml

    from jaxeff.config import to_dict
    from train.generate import main

    path, _, _ = hf_dir
    run_dir = tmp_path / "run"  # a training run directory (model.yaml) that has no checkpoint yet
    run_dir.mkdir()
    (run_dir / "model.yaml").write_text(yaml.safe_dump(to_dict(LMConfig(vocab_size=VOCAB))))
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--model", str(tmp_path / "missing"), "--prompt", "x"], "no such directory"),
        (["--model", str(empty), "--prompt", "x"], "neither config.json"),
        (["--model", str(run_dir), "--prompt", "x"], "checkpoint"),
        (["--model", str(path / "config.json"), "--prompt", "x"], "is a file"),
        (["--model", str(path), "--prompt", "x", "--temperature", "-1"], "temperature"),
        (["--model", str(path), "--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        _, err = capsys.readouterr()
        assert err.startswith("error: ") and message in err, (argv, err)


def test_prepare_prompts_accepts_tokenizer_output():
    # a BatchEncoding-like mapping: one chat-templated prompt as a flat list, or a right-padded batch with a mask
    tokens, lengths = prepare_prompts({"input_ids": [5, 6, 7]})
    assert lengths.tolist() == [3] and tokens[0, :3].tolist() == [5, 6, 7]
    batch = {"input_ids": np.array([[5, 6, 7], [8, 0, 0]]), "attention_mask": np.array([[1, 1, 1], [1, 0, 0]])}
    tokens, lengths = prepare_prompts(batch)
    assert lengths.tolist() == [3, 1] and tokens[1, 0] == 8
    left = {"input_ids": np.array([[5, 6, 7], [0, 0, 8]]), "attention_mask": np.array([[1, 1, 1], [0, 0, 1]])}
    with pytest.raises(ValueError, match="right-padded"):
        prepare_prompts(left)
