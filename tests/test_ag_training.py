"""Attention-Gate training jobs (``python -m train.attention_gate``): CPT trains the gates and nothing else, the run
loads with its gates, the saved gates load alone; the SFT task split is clean and balanced; SFT reports accuracy and
an eviction ratio for both arms; bad configs fail naming the field."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from jaxeff.config import ConfigError, from_dict
from jaxeff.data.tasks import BookClassification, KJVBooksTask
from jaxeff.methods.kv_eviction import AttentionGate, load_gates
from jaxeff.training import TrainConfig, load_run, read_metrics, train
from jaxeff.training.attention_gate import load_job_config, run_cpt
from jaxeff.training.config import OptimConfig
from jaxeff.training.optim import make_optimizer
from jaxeff.training.sft import SFTConfig, answer_loss, make_sft_step, train_sft

# The small model, BPE (320 entries: cached and shared with the other training tests) and books of test_resume.
LM_RUN = {
    "model": {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4,
              "num_kv_heads": 2, "max_position_embeddings": 64},
    "data": {"seq_len": 32, "train_books": ["Ruth", "Esther"], "heldout_books": ["Jonah"]},
    "optim": {"lr": 3e-3, "warmup_steps": 2},
    "train": {"steps": 20, "batch_size": 8, "log_every": 10, "eval_every": 0, "eval_batches": 2,
              "eval_batch_size": 8, "progress": False},
    "checkpoint": {"every": 0, "keep": 1, "async_save": False},
}
# init_bias 0: the gate scores start near the 0.5 threshold, so even a few steps leave gates that evict
GATE = {"heads": 1, "head_dim": 8, "target_keep": 0.5, "loss_weight": 10.0, "init_bias": 0.0}
# " Ruth" and " Jonah" both start with the bare-space token in this small BPE; " king" and " and" are single tokens.
TASK = {"books": ["Ruth", "Jonah"], "labels": ["king", "and"], "verses": 2, "test_fraction": 0.25, "seq_len": 48,
        "test_per_label": 4}


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm")
    result = train(from_dict(TrainConfig, {**LM_RUN, "output_dir": str(out)}))
    return out, result


@pytest.fixture(scope="module")
def cpt_run(lm_run, tmp_path_factory):
    lm_dir, _ = lm_run
    out = tmp_path_factory.mktemp("cpt")
    data = {**LM_RUN, "init_from": str(lm_dir), "attention_gate": GATE, "output_dir": str(out),
            "train": {**LM_RUN["train"], "steps": 4, "trainable": "methods"}, "optim": {"lr": 1e-3, "warmup_steps": 1}}
    path = out / "cpt.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = load_job_config(path)
    assert isinstance(cfg, TrainConfig) and cfg.attention_gate == AttentionGate(**GATE)
    return out, cfg, run_cpt(cfg)


def test_cpt_trains_the_gates_only(lm_run, cpt_run):
    lm_dir, lm_result = lm_run
    cpt_dir, cfg, results = cpt_run
    _, lm_params, _ = load_run(lm_dir)
    model, params, _ = load_run(cpt_dir)
    base = {k: v for k, v in params.items() if k != "methods"}
    assert _flat(base).keys() == _flat(lm_params).keys()
    for name, value in _flat(lm_params).items():
        np.testing.assert_array_equal(_flat(base)[name], value, err_msg=name)  # bit-identical base
    # the gates moved away from their initialisation (the trainer's own init of the method parameters)
    from jaxeff import sharding as shd
    from jaxeff.training.trainer import _init_methods

    init = _init_methods(model, shd.make_mesh(cfg.mesh), cfg.seed)["attention_gate"]
    trained = _flat(params["methods"]["attention_gate"])
    changed = [k for k, v in _flat(init).items() if not np.array_equal(v, trained[k])]
    assert len(changed) == len(_flat(init)), f"only {changed} changed"
    # the base perplexity is the pretrained run's own held-out perplexity (same windows, same weights, no gates)
    assert results["base_ppl"] == pytest.approx(lm_result.eval_ppl, rel=1e-5)
    assert 0.05 < results["eviction_ratio"] < 0.95
    assert results["eviction_ratio"] == pytest.approx(1.0 - read_metrics(cpt_dir, "eval")[-1]["gate_keep"], abs=1e-6)
    assert json.loads((cpt_dir / "results.json").read_text())["gated_ppl"] == pytest.approx(results["gated_ppl"])


def test_cpt_run_loads_with_its_gates(cpt_run):
    cpt_dir, cfg, _ = cpt_run
    model, params, _ = load_run(cpt_dir)
    assert [type(m) for m in model.methods] == [AttentionGate] and model.methods[0] == cfg.attention_gate
    gate, gates = load_gates(cpt_dir / "gates", model.config)
    assert gate == cfg.attention_gate
    saved, trained = _flat(gates), _flat(params["methods"]["attention_gate"])
    assert saved.keys() == trained.keys()
    for k in saved:
        np.testing.assert_array_equal(saved[k], trained[k])
    out = model.forward(params, np.zeros((1, 8), np.int32))
    assert out.aux["gate_keep"].shape == (model.config.num_layers,)


def test_cpt_starts_from_saved_gates(lm_run, cpt_run, tmp_path):
    from jaxeff import sharding as shd
    from jaxeff.training.trainer import build_model_and_tokenizer

    lm_dir, _ = lm_run
    cpt_dir, _, _ = cpt_run
    data = {**LM_RUN, "init_from": str(lm_dir), "attention_gate": GATE, "gates_from": str(cpt_dir),
            "output_dir": str(tmp_path / "o"), "train": {**LM_RUN["train"], "trainable": "methods"}}
    cfg = from_dict(TrainConfig, data)
    mesh = shd.make_mesh(cfg.mesh)
    model, params, _ = build_model_and_tokenizer(cfg, mesh)
    _, saved = load_gates(cpt_dir / "gates", model.config)
    started = _flat(params["methods"]["attention_gate"])
    assert started.keys() == _flat(saved).keys()
    for k, v in _flat(saved).items():
        np.testing.assert_array_equal(started[k], v, err_msg=k)
    _, lm_params, _ = load_run(lm_dir)
    for k, v in _flat(lm_params).items():  # the base is the init_from model's
        np.testing.assert_array_equal(_flat({k2: v2 for k2, v2 in params.items() if k2 != "methods"})[k], v)
    other = from_dict(TrainConfig, {**data, "attention_gate": {**GATE, "head_dim": 16}})
    with pytest.raises(ConfigError, match=r"'attention_gate\.heads/head_dim': expected those of the gates in "
                                          r"gates_from \(1 x 8\)"):
        build_model_and_tokenizer(other, mesh)
    missing = from_dict(TrainConfig, {**data, "gates_from": str(tmp_path / "none")})
    with pytest.raises(ConfigError, match=r"'gates_from': expected a directory written by save_gates"):
        build_model_and_tokenizer(missing, mesh)
    # the whole CPT job continues them: trains, compares with the base model, saves the new gates
    short = from_dict(TrainConfig, {**data, "train": {**data["train"], "steps": 2}, "optim": {"warmup_steps": 1}})
    results = run_cpt(short)
    assert results["steps"] == 2 and results["steps_this_call"] == 2 and results["base_ppl"] > 1.0
    assert (tmp_path / "o" / "gates").is_dir()
    # resumed at the final step: nothing trains, the comparison is recomputed, the results stay strict JSON
    again = run_cpt(short, resume=True)
    assert again["steps_this_call"] == 0 and again["tokens_per_s"] is None
    assert again["gated_ppl"] == pytest.approx(results["gated_ppl"], rel=1e-5)

    def no_constants(name):
        raise AssertionError(f"results.json holds {name}")

    json.loads((tmp_path / "o" / "results.json").read_text(), parse_constant=no_constants)


def test_recall_mixture_needs_room_in_the_sequence(lm_run, tmp_path):
    lm_dir, _ = lm_run
    data = {**LM_RUN, "init_from": str(lm_dir), "attention_gate": GATE, "output_dir": str(tmp_path / "o"),
            "data": {**LM_RUN["data"], "recall_rate": 0.5}, "train": {**LM_RUN["train"], "trainable": "methods"}}
    with pytest.raises(ConfigError, match=r"'data\.recall_rate': recall split: expected room for the fact"):
        train(from_dict(TrainConfig, data))  # 32-token sequences cannot hold a fact, a gap and a question


def _task(tokenizer, **changes) -> BookClassification:
    return BookClassification(from_dict(KJVBooksTask, {**TASK, **changes}, "task"), tokenizer, seed=3)


def test_sft_split_disjoint_balanced_and_label_blind(lm_run):
    _, _, tokenizer = load_run(lm_run[0])
    data = _task(tokenizer)
    test_verses = {(p.book, v) for p in data.test_passages for v in range(p.start, p.stop)}
    assert len(test_verses) == sum(p.stop - p.start for p in data.test_passages)  # test passages do not overlap
    train = [data.train_passage(i) for i in range(400)]
    train_verses = {(p.book, v) for p in train for v in range(p.start, p.stop)}
    assert not train_verses & test_verses
    for book in TASK["books"]:
        n_train, _ = data.splits[book]
        assert max(v for b, v in train_verses if b == book) < n_train <= min(v for b, v in test_verses if b == book)
    assert [p.label for p in data.test_passages] == [0, 1] * (len(data.test_passages) // 2)  # balanced, interleaved
    assert np.bincount([p.label for p in train[:8]]).tolist() == [4, 4]
    batch = data.train_batch(0, 8)
    rows = np.arange(8)
    # the target after the prompt's last token is the label's first answer token
    np.testing.assert_array_equal(batch["tokens"][rows, batch["answer_pos"] + 1], data.answer_ids[batch["label"]])
    test = data.test_arrays(multiple_of=16)
    n = len(data.test_passages)
    assert len(test["tokens"]) % 16 == 0 and test["weight"].sum() == n and not test["valid"][n:].any()
    np.testing.assert_array_equal(test["valid"].sum(1)[:n] - 1, test["answer_pos"][:n])  # inputs end at the prompt


def test_sft_reports_accuracy_and_eviction(lm_run, cpt_run, tmp_path):
    cpt_dir, _, _ = cpt_run
    data = {"task": TASK, "init_from": str(lm_run[0]), "gates_from": str(cpt_dir), "attention_gate": GATE,
            "optim": {"lr": 1e-3, "warmup_steps": 1},
            "train": {"steps": 3, "batch_size": 8, "log_every": 1, "eval_every": 0, "eval_batch_size": 8,
                      "trainable": "methods", "progress": False},
            "checkpoint": {"every": 0, "async_save": False}, "output_dir": str(tmp_path / "sft")}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(data))
    cfg = load_job_config(tmp_path / "sft.yaml")
    assert isinstance(cfg, SFTConfig)
    result = train_sft(cfg)
    gated, base = result.arms["gated"], result.arms["base"]
    for arm in (gated, base):
        assert 0.0 <= arm["accuracy"] <= 1.0 and len(arm["per_label_accuracy"]) == 2
    assert 0.05 < gated["eviction_ratio"] < 0.95 and base["eviction_ratio"] == 0.0
    assert gated["trained"] and not base["trained"]  # trainable: methods leaves the base arm as it is
    assert json.loads((tmp_path / "sft" / "results.json").read_text())["arms"]["gated"]["accuracy"] == gated["accuracy"]
    model, params, _ = load_run(tmp_path / "sft" / "gated")
    assert model.methods and load_gates(tmp_path / "sft" / "gated" / "gates", model.config)[0] == AttentionGate(**GATE)
    _, lm_params, _ = load_run(lm_run[0])
    for k, v in _flat(lm_params).items():
        np.testing.assert_array_equal(_flat({kk: vv for kk, vv in params.items() if kk != "methods"})[k], v)


def test_answer_loss_open_gates_equal_base_and_only_answers_count(lm_run):
    """With gates that keep everything, the gated arm's loss and base-weight gradients are the base arm's; the
    loss reads only the answer tokens."""
    model, params, tokenizer = load_run(lm_run[0])
    data = _task(tokenizer)
    batch = data.train_batch(0, 4)
    gate = AttentionGate(heads=1, head_dim=8, init_bias=50.0, loss_weight=0.0)
    gated = model.with_methods(gate)
    gparams = {**params, "methods": {"attention_gate": gate.init(jax.random.key(1), model.config)}}

    def value_and_grad(m):
        return jax.jit(jax.value_and_grad(
            lambda p, b: answer_loss(m, p, b, data.max_label_len, data.answer_ids), has_aux=True))

    base_vg = value_and_grad(model)
    (l_base, _), g_base = base_vg(params, batch)
    (l_gated, m_gated), g_gated = value_and_grad(gated)(gparams, batch)
    assert float(m_gated["gate_keep"]) == 1.0
    np.testing.assert_allclose(float(l_gated), float(l_base), rtol=1e-6)
    for k, v in _flat(g_base).items():
        np.testing.assert_allclose(_flat({kk: vv for kk, vv in g_gated.items() if kk != "methods"})[k], v,
                                   rtol=1e-4, atol=1e-7, err_msg=k)
    # padding after the answer and the label's own tokens: only the answer changes the loss
    padded = {**batch, "tokens": batch["tokens"].copy()}
    ends = batch["answer_pos"] + batch["label_len"] + 1  # past the last label token
    for i, e in enumerate(ends):
        padded["tokens"][i, e:] = 7
    assert float(base_vg(params, padded)[0][0]) == float(l_base)
    flipped = {**batch, "tokens": batch["tokens"].copy()}
    rows = np.arange(4)
    flipped["tokens"][rows, batch["answer_pos"] + 1] = data.answer_ids[1 - batch["label"]]
    assert float(base_vg(params, flipped)[0][0]) != float(l_base)


def test_sft_step_skips_a_non_finite_gradient(lm_run):
    model, params, tokenizer = load_run(lm_run[0])
    data = _task(tokenizer)
    batch = data.train_batch(0, 4)
    tx = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=0), 10)
    step = jax.jit(make_sft_step(model, tx, data.max_label_len, data.answer_ids))
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.key_data(jax.random.key(0))}
    state, metrics = step(state, batch)
    assert float(metrics["skipped"]) == 0.0 and np.isfinite(float(metrics["grad_norm"]))
    poisoned = dict(state)
    emb = np.asarray(params["embed"]["embedding"]).copy()
    emb[batch["tokens"][0, 0]] = np.inf  # an overflow somewhere: every gradient turns non-finite
    poisoned["params"] = {**state["params"], "embed": {"embedding": jnp.asarray(emb)}}
    after, metrics = step(poisoned, batch)
    assert float(metrics["skipped"]) == 1.0 and int(after["step"]) == 2
    for a, b in zip(jax.tree.leaves((poisoned["params"], poisoned["opt_state"])),
                    jax.tree.leaves((after["params"], after["opt_state"]))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("data, match", [
    ({"job": "sft", "init_from": "smollm2", "attention_gate": {}}, r"config field 'task' is required"),
    ({"task": {**TASK, "books": ["Ruth", "Hezekiah"]}, "init_from": "x", "attention_gate": {}},
     r"'task\.books'.*got 'Hezekiah'"),
    ({"task": {**TASK, "labels": ["king"]}, "init_from": "x", "attention_gate": {}}, r"'task\.labels': expected 2"),
    ({"task": TASK, "init_from": "x", "attention_gate": {}, "job": "pretrain"}, r"'job': expected one of"),
    ({"init_from": "smollm2", "model": {"vocab_size": 320}}, r"'attention_gate': expected the gate settings"),
    ({"attention_gate": {}, "model": {"vocab_size": 320}}, r"'init_from': expected the pretrained model"),
    ({"task": TASK, "init_from": "x", "attention_gate": {"prefill": "dense"}}, r"'attention_gate\.prefill': expected"),
    ({"init_from": "smollm2", "attention_gate": {"prefill": "dense"}},
     r"'attention_gate\.prompt_len': expected an int"),
    ({"init_from": "smollm2", "attention_gate": {"prefill": "dense", "prompt_len": 256}, "data": {"seq_len": 256}},
     r"'attention_gate\.prompt_len': expected an int below data\.seq_len=256"),
    ({"init_from": "smollm2", "attention_gate": {}, "data": {"recall_rate": 1.5}},
     r"'data\.recall_rate': expected a share in \[0, 1\]"),
    ({"init_from": "smollm2", "attention_gate": {}, "data": {"recall_min_gap": -2}},
     r"'data\.recall_min_gap': expected an int >= 0"),
    ({"init_from": "smollm2", "gates_from": "runs/x"}, r"'gates_from': expected null unless an attention_gate"),
])
def test_bad_configs_name_the_field(tmp_path, data, match):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=match):
        load_job_config(path)


def test_label_collisions_and_missing_runs_are_explained(lm_run, tmp_path, capsys):
    _, _, tokenizer = load_run(lm_run[0])
    with pytest.raises(ConfigError, match=r"'task\.labels': expected answer words whose first tokens differ"):
        _task(tokenizer, labels=None)  # " Ruth" and " Jonah" share their first token here
    from train.attention_gate import main

    missing = tmp_path / "runs" / "lm_tiny"
    rc = main(["--config", "configs/ag_tiny_sft.yaml", f"init_from={missing}", f"output_dir={tmp_path / 'o'}"])
    assert rc == 2
    assert "python -m train.lm --config configs/lm_tiny.yaml" in capsys.readouterr().err


def test_bundled_configs_load():
    for name, kind in (("ag_tiny_cpt", TrainConfig), ("ag_smollm2_cpt", TrainConfig), ("ag_tiny_sft", SFTConfig),
                       ("ag_smollm2_sft", SFTConfig), ("ag_smollm2_cpt_dense", TrainConfig),
                       ("ag_tiny_cpt_dense", TrainConfig), ("ag_smollm2_cpt_recall", TrainConfig)):
        cfg = load_job_config(f"configs/{name}.yaml")
        assert isinstance(cfg, kind), name
        if kind is TrainConfig:
            assert cfg.train.trainable == "methods" and cfg.attention_gate is not None
