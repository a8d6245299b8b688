"""Typed configs: ``from_dict`` checks every key and value against the dataclass fields and says which field,
what was expected and what it got; overrides and YAML files feed it."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import pytest

from jaxeff import LMConfig, RopeScaling
from jaxeff.config import ConfigError, apply_overrides, from_dict, load_config, to_dict


@dataclasses.dataclass(frozen=True)
class Optim:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    steps: int = 10
    seeds: tuple[int, ...] = (0,)
    optim: Optim = Optim()
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    debug: bool = False


def test_from_dict_builds_nested_typed_config():
    cfg = from_dict(Run, {
        "name": "r1", "steps": 20.0, "seeds": [1, 2, 3], "tags": {"a": "b"},
        "optim": {"lr": 1, "betas": [0.8, 0.99], "schedule": "constant", "warmup": None},
    })
    assert cfg == Run(name="r1", steps=20, seeds=(1, 2, 3), tags={"a": "b"},
                      optim=Optim(lr=1.0, betas=(0.8, 0.99), schedule="constant", warmup=None))
    assert isinstance(cfg.steps, int) and isinstance(cfg.optim.lr, float)  # 20.0 -> 20, 1 -> 1.0
    assert from_dict(Run, {"name": "x", "optim": {"warmup": 5}}).optim == Optim(warmup=5)
    assert from_dict(Run, to_dict(cfg)) == cfg  # to_dict is the inverse


def test_from_dict_rejects_unknown_keys_naming_them():
    with pytest.raises(ConfigError) as info:
        from_dict(Run, {"name": "x", "stpes": 3, "debgu": True})
    msg = str(info.value)
    assert "debgu" in msg and "stpes" in msg and "steps" in msg, msg  # the known fields are listed
    with pytest.raises(ConfigError, match=r"optim\.lrr"):
        from_dict(Run, {"name": "x", "optim": {"lrr": 0.1}})


@pytest.mark.parametrize(
    "data, field, expected, actual",
    [
        ({"steps": "ten"}, "steps", "int", "'ten'"),
        ({"steps": True}, "steps", "int", "True"),  # a bool is not an int here
        ({"steps": 2.5}, "steps", "int", "2.5"),
        ({"debug": 1}, "debug", "bool", "1"),
        ({"optim": {"lr": "fast"}}, "optim.lr", "float", "'fast'"),
        ({"optim": {"schedule": "linear"}}, "optim.schedule", "one of 'cosine', 'constant'", "'linear'"),
        ({"optim": {"betas": [0.9]}}, "optim.betas", "a list of 2 items", "[0.9]"),
        ({"optim": {"betas": 0.9}}, "optim.betas", "a list of float", "0.9"),
        ({"optim": {"warmup": "x"}}, "optim.warmup", "int or null", "'x'"),
        ({"seeds": [1, "a"]}, "seeds[1]", "int", "'a'"),
        ({"optim": 5}, "optim", "a mapping for Optim", "5"),
        ({"tags": ["a"]}, "tags", "a mapping", "['a']"),
        ({"name": 3}, "name", "str", "3"),
    ],
)
def test_from_dict_wrong_types_name_field_expected_actual(data, field, expected, actual):
    with pytest.raises(ConfigError) as info:
        from_dict(Run, {"name": "x", **data})
    assert str(info.value) == f"config field '{field}': expected {expected}, got {actual}"


def test_missing_required_field_and_non_mapping():
    with pytest.raises(ConfigError, match="'name' is required"):
        from_dict(Run, {"steps": 3})
    with pytest.raises(ConfigError, match="mapping for Run"):
        from_dict(Run, ["name", "x"])


def test_lm_config_from_dict():
    cfg = from_dict(LMConfig, {"vocab_size": 128, "rope_scaling": {"rope_type": "llama3", "factor": 8}})
    assert cfg.rope_scaling == RopeScaling(rope_type="llama3", factor=8.0)
    with pytest.raises(ConfigError, match=r"'rope_scaling\.rope_type'.*'yarn'"):
        from_dict(LMConfig, {"rope_scaling": {"rope_type": "yarn"}})
    with pytest.raises(ConfigError, match="'model.num_kv_heads'.*got 3"):  # the dataclass's own validation
        from_dict(LMConfig, {"num_heads": 4, "num_kv_heads": 3})


# ---- overrides and files ------------------------------------------------------------------------------------


def test_apply_overrides_dotted_keys_and_yaml_values():
    base = {"name": "r", "optim": {"lr": 0.1}}
    out = apply_overrides(base, [
        "optim.lr=1e-3",  # PyYAML reads this as a string (YAML 1.1); the float field must still accept it
        "optim.betas=[0.5, 0.6]",
        "optim.warmup=null",
        "--steps=7",
        "debug=true",
        "tags.owner=me",  # creates the missing section
        "name=two words",
    ])
    assert base == {"name": "r", "optim": {"lr": 0.1}}  # the input is not modified
    cfg = from_dict(Run, out)
    assert cfg == Run(name="two words", steps=7, debug=True, tags={"owner": "me"},
                      optim=Optim(lr=1e-3, betas=(0.5, 0.6), warmup=None))


@pytest.mark.parametrize(
    "override, match",
    [
        ("steps", "not of the form key=value"),
        ("steps=[1, 2", "not valid YAML"),
        ("name.first=1", "'name' is not a section"),
    ],
)
def test_bad_overrides_raise(override, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides({"name": "r"}, [override])


def test_load_config_from_yaml_file_with_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: tiny\nsteps: 5\noptim:\n  lr: 2e-4\n  schedule: constant\nseeds: [3, 4]\n")
    cfg = load_config(Run, path, overrides=["steps=9", "optim.warmup=2"])
    assert cfg == Run(name="tiny", steps=9, seeds=(3, 4), optim=Optim(lr=2e-4, schedule="constant", warmup=2))
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(Optim, empty) == Optim()
    assert load_config(Run, None, overrides=["name=n"]) == Run(name="n")


def test_load_config_file_errors(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml.*does not exist"):
        load_config(Run, missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*not valid YAML"):
        load_config(Run, bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping at the top level, got list"):
        load_config(Run, listed)
    typo = tmp_path / "typo.yaml"
    typo.write_text("name: x\noptim:\n  lr: 0.1\n  shedule: cosine\n")
    with pytest.raises(ConfigError, match=r"optim\.shedule"):
        load_config(Run, typo)
