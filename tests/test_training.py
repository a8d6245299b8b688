"""Training building blocks: config validation, data pipeline, optimizer, gradient accumulation, sharded steps."""

import dataclasses

import jax
import numpy as np
import pytest

from jaxeff import DecoderLM, LMConfig
from jaxeff.config import ConfigError, from_dict, load_config
from jaxeff.data import kjv
from jaxeff.data.text import WindowSampler, eval_windows, kjv_bpe_tokenizer, unigram_perplexity
from jaxeff.sharding import DEFAULT_RULES, MeshConfig, logical_to_spec, make_mesh, shard_host_batch
from jaxeff.training import TrainConfig
from jaxeff.training.config import OptimConfig
from jaxeff.training.optim import decay_mask, lr_schedule, make_optimizer
from jaxeff.training.steps import batch_sharding, init_state, jit_train_step, state_shardings

TINY = LMConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
SEQ, BATCH = 32, 8


# ---- config --------------------------------------------------------------------------------------------------------


def _cfg(**sections):
    return from_dict(TrainConfig, {"model": {"vocab_size": 320}, **sections})


@pytest.mark.parametrize(
    "data, match",
    [
        ({"model": {"vocab_size": 320, "hidden_sise": 64}}, r"unknown config field\(s\) model\.hidden_sise"),
        ({"train": {"steps": "many"}}, r"'train\.steps': expected int, got 'many'"),
        ({"optim": {"lr": -1.0}}, r"'optim\.lr': expected a positive float, got -1\.0"),
        ({"train": {"batch_size": 10, "grad_accum": 4}}, r"'train\.batch_size': expected a multiple of "
                                                          r"train\.grad_accum=4, got 10"),
        ({"data": {"seq_len": 4096}}, r"'data\.seq_len': expected <= model\.max_position_embeddings=2048, got 4096"),
        ({"data": {"heldout_books": ["Genesis", "Hezekiah"]}}, r"'data\.heldout_books'.*got 'Hezekiah'"),
        ({"data": {"train_books": ["Ruth"]}}, r"'data\.train_books'.*got \['Ruth'\]"),
        ({"optim": {"warmup_steps": 500}, "train": {"steps": 100}}, r"'optim\.warmup_steps': expected fewer than "
                                                                     r"train\.steps=100, got 500"),
        ({"distributed": {"num_processes": 2}}, r"'distributed': expected coordinator_address, num_processes and "
                                                r"process_id all set"),
    ],
)
def test_config_errors_name_field_expected_actual(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(TrainConfig, {"model": {"vocab_size": 320}, **data})


def test_config_bpe_needs_more_than_bytes():
    with pytest.raises(ConfigError, match=r"'model\.vocab_size': expected >= 257 .* got 256"):
        from_dict(TrainConfig, {"model": {"vocab_size": 256}})


def test_config_device_dependent_checks():
    with pytest.raises(ConfigError, match=r"'mesh': expected fixed axis sizes whose product \(4\) divides the "
                                          r"device count 6"):
        _cfg(mesh={"data": -1, "tensor": 4}).validate(6)
    cfg = _cfg(train={"batch_size": 12, "grad_accum": 2}, mesh={"data": 4})
    with pytest.raises(ConfigError, match=r"'train\.batch_size': expected a multiple of grad_accum x data-parallel "
                                          r"size = 2 x 4 .* got 12"):
        cfg.validate(4)
    with pytest.raises(ConfigError, match=r"'mesh': expected axis sizes whose product equals the device count 8, "
                                          r"product is 4"):
        _cfg(mesh={"data": 2, "tensor": 2}).validate(8)
    assert _cfg(train={"batch_size": 16, "grad_accum": 2}, mesh={"data": 2, "fsdp": 2, "tensor": 2}).validate(8) \
        == (2, 2, 1, 2)


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {vocab_size: 384, hidden_size: 32, num_heads: 2, num_kv_heads: 1}\noptim: {lr: 1e-3}\n")
    cfg = load_config(TrainConfig, path, ["train.steps=70", "optim.lr=3e-4", "init_from=smollm2"])
    assert cfg.model.hidden_size == 32 and cfg.train.steps == 70 and cfg.optim.lr == 3e-4
    assert cfg.init_from == "smollm2" and cfg.tokenizer_kind == "pretrained"
    assert _cfg().tokenizer_kind == "bpe"
    with pytest.raises(ConfigError, match=r"'data\.tokenizer': expected 'bpe' or a tokenizer directory"):
        _cfg(data={"tokenizer": "pretrained"})


def test_cli_reports_config_errors(tmp_path, capsys):
    from train.lm import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {vocab_size: 320}\n")
    # Overrides before and after the flags are all applied: the last one makes the batch indivisible.
    rc = main(["--config", str(cfg), "train.batch_size=12", "--resume", "train.grad_accum=5"])
    assert rc == 2
    assert "'train.batch_size': expected a multiple of train.grad_accum=5, got 12" in capsys.readouterr().err


def test_bundled_configs_load():
    tiny = load_config(TrainConfig, "configs/lm_tiny.yaml")
    assert tiny.init_from is None and tiny.tokenizer_kind == "bpe"
    ft = load_config(TrainConfig, "configs/lm_smollm2_finetune.yaml")
    assert ft.init_from == "smollm2" and ft.tokenizer_kind == "pretrained"


# ---- data -----------------------------------------------------------------------------------------------------------


def test_kjv_split_is_by_whole_books():
    train, held = kjv.split_books()
    assert set(train).isdisjoint(held) and len(train) + len(held) == 66
    assert held == tuple(b for b in kjv.BOOKS if b in kjv.DEFAULT_HELDOUT_BOOKS)
    verses = kjv.book_verses("Genesis")
    assert verses[0].startswith("In the beginning God created") and len(verses) == 1533


def test_bpe_tokenizer_deterministic_and_loadable(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXEFF_CACHE", str(tmp_path / "cache"))
    books = ("Ruth", "Jonah")
    a = kjv_bpe_tokenizer(300, books)
    cached = list((tmp_path / "cache" / "tokenizers").iterdir())
    assert len(cached) == 1
    monkeypatch.setenv("JAXEFF_CACHE", str(tmp_path / "cache2"))  # a fresh cache: trained again
    b = kjv_bpe_tokenizer(300, books)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert len(a) == 300 and a.eos_token_id == 0
    text = "And Jonah rose up to flee unto Tarshish. ÆØ 123"
    ids = a(text)["input_ids"]
    assert a.decode(ids) == text  # byte-level: lossless, no unknown token
    a.save_pretrained(tmp_path / "tok")
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok", local_files_only=True)
    assert loaded(text)["input_ids"] == ids and loaded.eos_token_id == 0


def test_window_sampler_positions_and_epochs():
    tokens = np.arange(1 + 10 * 4, dtype=np.int32)  # exactly 10 windows of 5 tokens (seq_len 4)
    s = WindowSampler(tokens, 4, seed=3)
    assert s.num_windows == 10
    whole = s.batch(0, 25)
    # Position-addressed: splitting the stream into any batches gives the same sequence of windows.
    np.testing.assert_array_equal(np.concatenate([s.batch(0, 7), s.batch(7, 11), s.batch(18, 7)]), whole)
    for epoch in range(2):  # each epoch is a permutation of all windows
        starts = whole[epoch * 10:(epoch + 1) * 10, 0]
        assert sorted(starts.tolist()) == list(range(0, 40, 4))
    assert not np.array_equal(whole[:10], whole[10:20])  # epochs are reshuffled
    np.testing.assert_array_equal(whole[:, 1:], whole[:, :-1] + 1)  # windows are contiguous
    assert WindowSampler(tokens, 4, seed=3).batch(5, 5).tolist() == whole[5:10].tolist()
    assert s.check_state(s.state(17)) == 17
    with pytest.raises(ValueError, match="'seq_len' was 4 when saved"):
        WindowSampler(tokens, 2, seed=3).check_state(s.state(17))


def test_eval_windows_and_unigram():
    tokens = np.arange(101, dtype=np.int32)
    w = eval_windows(tokens, 10, 4)
    assert w.shape == (4, 11) and w[0, 0] == 0 and w[-1, 0] == 90  # spread over the whole stream
    assert eval_windows(tokens, 10).shape == (10, 11)
    with pytest.raises(ValueError, match="has only 10"):
        eval_windows(tokens, 10, 11)
    train = np.array([0, 0, 0, 1])  # counts 3, 1, 0 over a 3-token vocabulary; add-one: 4/7, 2/7, 1/7
    targets = np.array([0, 1, 2, 2])
    expected = np.exp(-np.mean(np.log([4 / 7, 2 / 7, 1 / 7, 1 / 7])))
    assert unigram_perplexity(train, targets, 3) == pytest.approx(expected, rel=1e-12)


# ---- optimizer -----------------------------------------------------------------------------------------------------


def test_lr_schedule_warmup_then_cosine():
    cfg = OptimConfig(lr=1e-2, warmup_steps=10, min_lr_ratio=0.1)
    sched = lr_schedule(cfg, 110)
    assert float(sched(0)) == 0.0
    assert float(sched(5)) == pytest.approx(5e-3)
    assert float(sched(10)) == pytest.approx(1e-2)
    assert float(sched(60)) == pytest.approx(1e-3 + 0.5 * 9e-3, rel=1e-5)  # half-way down the cosine
    assert float(sched(110)) == pytest.approx(1e-3)


def test_weight_decay_skips_norms_and_biases():
    model = DecoderLM(dataclasses.replace(TINY, qkv_bias=True))
    mask = decay_mask(jax.eval_shape(model.init, jax.random.key(0)))
    assert mask["layers"]["attn"]["q"]["kernel"] and mask["embed"]["embedding"]
    assert not mask["layers"]["attn"]["q"]["bias"] and not mask["layers"]["attn_norm"]["scale"]
    assert not mask["final_norm"]["scale"]


# ---- steps: accumulation and sharding -------------------------------------------------------------------------------

# A tiny lr and an eps well above float32 gradient noise: Adam's first update is ~sign(g), so near-zero gradients
# would otherwise turn summation-order differences (1e-9) into update differences of order lr.
OPTIM = OptimConfig(lr=1e-3, warmup_steps=0, eps=1e-5)
_RESULTS = {}


def _run_steps(mesh_cfg, devices, grad_accum=1, steps=2):
    """Loss/grad-norm of each step and the final params, for a tiny model on fixed random data."""
    key = (mesh_cfg, len(devices), grad_accum)
    if key in _RESULTS:
        return _RESULTS[key]
    model = DecoderLM(TINY)
    tx = make_optimizer(OPTIM, 10)
    mesh = make_mesh(mesh_cfg, devices)
    shardings = state_shardings(model, tx, mesh)
    state = init_state(model, tx, jax.random.key(0), shardings)
    step = jit_train_step(model, tx, mesh, shardings, batch_sharding(mesh, BATCH, SEQ), grad_accum)
    data = np.random.default_rng(0).integers(0, TINY.vocab_size, (steps, BATCH, SEQ + 1)).astype(np.int32)
    metrics = []
    for i in range(steps):
        state, m = step(state, shard_host_batch(data[i], mesh))
        metrics.append(jax.device_get(m))
    _RESULTS[key] = (metrics, state, mesh)
    return _RESULTS[key]


def _max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_grad_accumulation_equals_full_batch(devices8):
    full, s_full, _ = _run_steps(MeshConfig(data=1), devices8[:1], grad_accum=1)
    acc, s_acc, _ = _run_steps(MeshConfig(data=1), devices8[:1], grad_accum=2)
    for a, b in zip(full, acc):
        assert abs(float(a["loss"]) - float(b["loss"])) < 5e-6  # a few float32 ulps of the mean
        assert abs(float(a["grad_norm"]) - float(b["grad_norm"])) < 1e-6
    assert _max_diff(s_full["params"], s_acc["params"]) < 1e-6
    assert int(s_acc["step"]) == 2


@pytest.mark.parametrize("mesh_cfg, grad_accum", [(MeshConfig(data=2, fsdp=2, tensor=2), 1),
                                                  (MeshConfig(data=8), 1),
                                                  (MeshConfig(data=2, fsdp=2, tensor=2), 2)])
def test_sharded_step_matches_one_device(devices8, mesh_cfg, grad_accum):
    ref, s_ref, _ = _run_steps(MeshConfig(data=1), devices8[:1])
    got, s_got, mesh = _run_steps(mesh_cfg, devices8, grad_accum)
    for a, b in zip(ref, got):
        assert abs(float(a["loss"]) - float(b["loss"])) < 1e-5
        assert abs(float(a["grad_norm"]) - float(b["grad_norm"])) < 1e-5
    assert _max_diff(s_ref["params"], s_got["params"]) < 1e-5
    assert _max_diff(s_ref["opt_state"], s_got["opt_state"]) < 1e-5

    # Parameters and Adam moments carry the shardings of the logical-axis rules; counters are replicated.
    model = DecoderLM(TINY)
    axes = model.param_axes()
    flat_axes = jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))[0]
    adam = s_got["opt_state"][1][0]
    for path, ax in flat_axes:
        p = _get(s_got["params"], path)
        want = logical_to_spec(ax, DEFAULT_RULES, mesh, p.shape)
        assert p.sharding.spec == want, path
        assert _get(adam.mu, path).sharding.spec == want and _get(adam.nu, path).sharding.spec == want
    if mesh_cfg.tensor == 2:  # the rules really shard something
        assert s_got["params"]["layers"]["mlp"]["up"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(
            None, "fsdp", "tensor")
    assert adam.count.sharding.is_fully_replicated and s_got["step"].sharding.is_fully_replicated


def _get(tree, path):
    for p in path:
        tree = tree[p.key]
    return tree
