"""benchmarks.sample_quality on a tiny Fashion-MNIST teacher and student: the rows, the skip of a missing
student, and the error for a student distilled from a teacher of another shape."""

import json

import jax
import pytest

from benchmarks import sample_quality
from jaxeff.config import load_config
from jaxeff.data import fashion_mnist as fm
from jaxeff.diffusion import image_quality
from jaxeff.methods.consistency.trainer import ConsistencyConfig, train_consistency
from jaxeff.training.vdit import train_vdit
from tests.vdit_tiny import CONFIG, tiny_config

pytestmark = pytest.mark.skipif(not fm.available(), reason="Fashion-MNIST not installed (apt-get install "
                                "dataset-fashion-mnist, or set $JAXEFF_FASHION_MNIST)")
IMAGES = ["data.dataset=fashion_mnist", "data.frames=1", "data.size=32", "model.in_channels=1",
          "model.out_channels=1"]


def _student(root, teacher, name, method, *extra):
    cfg = load_config(ConsistencyConfig, CONFIG.parent / f"cd_fmnist_{method}.yaml",
                      [f"teacher={teacher}", f"output_dir={root / name}", "train.steps=1", "train.batch_size=8",
                       "train.progress=false", "checkpoint.every=0", *extra])
    train_consistency(cfg)
    return root / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sq")
    train_vdit(tiny_config(root / "teacher", steps=1, extra=IMAGES))
    mcd = _student(root, root / "teacher", "mcd", "mcd", "segments=2")
    lcm = _student(root, root / "teacher", "lcm", "lcm")
    mlcm = _student(root, root / "teacher", "mlcm", "mlcm")
    return root, mcd, lcm, mlcm


@pytest.fixture
def random_extractor(monkeypatch):
    # an untrained classifier: the scores are only checked for form here (training it takes a minute)
    params = image_quality.init_classifier(jax.random.key(0))
    monkeypatch.setattr(image_quality, "load_classifier", lambda progress=True: (params, {"test_accuracy": None}))


def test_rows(runs, random_extractor, tmp_path):
    root, mcd, lcm, mlcm = runs
    out = tmp_path / "rows.jsonl"
    rows = sample_quality.main(["--teacher", str(root / "teacher"), "--students",
                                f"{mcd},{lcm},{mlcm},{root / 'none'}",
                                "--steps", "2,3", "--teacher-steps", "3", "--samples", "6", "--real", "8",
                                "--batch", "4", "--repeats", "1", "--guidance", "1.5", "--out", str(out)])
    assert all({"bench", "sampler", "steps", "metric", "value"} <= set(r) for r in rows)
    got = {(r["sampler"], r["steps"]) for r in rows}
    # the 2-segment MCD student samples with 1 or 2 steps only; LCM and MLCM (TLCM) with either; MLCM's
    # deterministic sampler on divisors of its 8 segments; a missing directory is skipped
    assert got == {("teacher_ddim", 3), ("ddim", 2), ("ddim", 3), ("mcd", 2), ("lcm", 2), ("lcm", 3), ("mlcm", 2),
                   ("mlcm", 3), ("mlcm_mcm", 2)}
    for r in rows:
        assert r["bench"] == "sample_quality" and r["samples"] == 6
        if r["metric"] == "sample_ms":
            assert r["value"] > 0
        if r["metric"] == "class_acc":
            assert 0 <= r["value"] <= 1
    assert {r["metric"] for r in rows} == {"fid", "class_acc", "sample_ms"}
    # the teacher's rows sample with --guidance; each student's row names the guidance it was distilled with
    assert {r["guidance_scale"] for r in rows if r["sampler"] in ("teacher_ddim", "ddim")} == {1.5}
    # (cd_fmnist_mcd.yaml distils with guidance 1.5, the other configs with the tiny teacher's 3)
    assert {r["guidance_scale"] for r in rows if r["sampler"] == "mcd"} == {1.5}
    assert {r["guidance_scale"] for r in rows if r["sampler"] in ("lcm", "mlcm", "mlcm_mcm")} == {3.0}
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows


def test_student_of_another_teacher_is_an_error(runs, random_extractor, tmp_path):
    root = runs[0]
    train_vdit(tiny_config(tmp_path / "wide", steps=1, extra=[*IMAGES, "model.ffn_dim=32"]))
    other = _student(tmp_path, tmp_path / "wide", "other", "mcd", "segments=2")
    with pytest.raises(SystemExit, match="another shape"):
        sample_quality.main(["--teacher", str(root / "teacher"), "--students", str(other), "--steps", "1",
                             "--teacher-steps", "2", "--samples", "4", "--real", "8", "--batch", "4",
                             "--repeats", "1"])


@pytest.mark.parametrize("bad", ["0", "2,-1", "nan", "2,x", ""])
def test_guidance_argument_errors(bad, capsys):
    with pytest.raises(SystemExit):
        sample_quality.build_parser().parse_args(["--guidance", bad])
    assert "--guidance" in capsys.readouterr().err
