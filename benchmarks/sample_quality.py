"""Few-step sample quality on Fashion-MNIST: the teacher's 50-step DDIM, DDIM at few steps and each distilled
student at few steps, scored side by side.

    python -m benchmarks.sample_quality [--quick] [--teacher runs/dit_fmnist]
                                        [--students runs/cd_fmnist_mcd,runs/cd_fmnist_lcm,...] [--out FILE]

Every sampler draws the same ``--samples`` images: the same starting noise and the same class labels (balanced
over the 10 classes). The teacher samples with its configured guidance (classifier-free, two passes per step),
or with each of ``--guidance`` in turn; students sample without guidance (the guidance they were distilled with,
recorded as ``guidance_scale`` in their rows, is baked in). Scores
(``jaxeff.diffusion.image_quality``): ``fid``, a Fréchet distance in the features of a Fashion-MNIST classifier
trained in the repo, against ``--real`` real test images (comparable between rows, not with published FIDs), and
``class_acc``, how often that classifier sees the requested class. ``sample_ms``: wall time to draw one batch of
``--batch`` images after compilation (median of ``--repeats``).

Rows: ``{"bench": "sample_quality", "sampler", "steps", "metric", "value", "unit", ...}`` with samplers
``teacher_ddim`` (the reference, ``--teacher-steps``, default 50), ``ddim`` (the teacher at few steps) and each
student's method name (``mcd``, ``lcm``, ``mlcm``, ``scott``) with its own sampler, plus ``mlcm_mcm``: the MLCM
student sampled deterministically on its segment boundaries instead of TLCM's re-noising. A student directory
that does not exist is skipped with a note; a student distilled from another teacher is an error.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy as np

from benchmarks._jsonl import JsonLines

BENCH = "sample_quality"
DEFAULT_STUDENTS = "runs/cd_fmnist_mcd,runs/cd_fmnist_lcm,runs/cd_fmnist_mlcm,runs/cd_fmnist_scott"


def _positive_int(text: str) -> int:
    v = int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text}")
    return v


def _steps(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive step counts, got {text!r}")
    return out


def _scales(text: str) -> tuple[float, ...]:
    try:
        out = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(g > 0 and math.isfinite(g) for g in out):
        raise argparse.ArgumentTypeError(f"expected positive guidance scales (1 = no guidance), got {text!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sample_quality", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples and real images (about 5 minutes)")
    ap.add_argument("--teacher", default="runs/dit_fmnist", help="a train.vdit run on fashion_mnist")
    ap.add_argument("--students", default=DEFAULT_STUDENTS, help="comma-separated train.consistency run dirs")
    ap.add_argument("--steps", type=_steps, default=(1, 2, 4, 8), help="few-step counts (default 1,2,4,8)")
    ap.add_argument("--teacher-steps", type=_positive_int, default=50)
    ap.add_argument("--guidance", type=_scales, default=None,
                    help="guidance scales for the teacher and DDIM rows, comma-separated (default: the teacher's)")
    ap.add_argument("--samples", type=_positive_int, default=None, help="images per sampler (default 2000; quick 500)")
    ap.add_argument("--real", type=_positive_int, default=None, help="real test images (default 5000; quick 2000)")
    ap.add_argument("--batch", type=_positive_int, default=250)
    ap.add_argument("--repeats", type=_positive_int, default=3, help="timed repeats of one batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    return ap


def main(argv=None) -> list:
    args = build_parser().parse_args(argv)
    import jax
    import jax.numpy as jnp

    from jaxeff.data import fashion_mnist as fm
    from jaxeff.diffusion.image_quality import ImageQuality
    from jaxeff.methods.consistency.trainer import load_student, make_sampler
    from jaxeff.training.vdit import load_vdit_run, sample_clips

    n = args.samples or (500 if args.quick else 2000)
    n_real = args.real or (2000 if args.quick else 5000)
    if n < 2:
        raise SystemExit("--samples: at least 2 (a Fréchet distance needs a covariance)")
    tcfg, model, teacher, tstep = load_vdit_run(args.teacher)
    if tcfg.data.dataset != "fashion_mnist":
        raise SystemExit(f"--teacher: expected a run on fashion_mnist, {args.teacher} trained on {tcfg.data.dataset}")
    # every student is loaded and checked before anything is sampled, so a wrong one fails at once
    students = []
    for d in [s for s in args.students.split(",") if s]:
        if not pathlib.Path(d).exists():
            print(f"[{BENCH}] skipping {d}: no such run directory", file=sys.stderr)
            continue
        cfg, scfg, smodel, student, sstep = load_student(d)
        if scfg.model != tcfg.model:
            raise SystemExit(f"{d}: distilled from a teacher of another shape ({cfg.teacher}) than --teacher")
        students.append((d, cfg, scfg, smodel, student, sstep))
    table = fm.class_embedding_table(tcfg.model.text_dim)
    labels = np.arange(n) % 10
    text_all = fm.embed_labels(labels, table)
    shape = (n, tcfg.model.in_channels, 1, tcfg.data.size, tcfg.data.size)
    z_all = np.random.default_rng([args.seed, 1]).standard_normal(shape).astype(np.float32)
    quality = ImageQuality(num_real=n_real)
    common = {"teacher": str(args.teacher), "teacher_step": int(tstep), "samples": n, "real": n_real,
              "machine": f"{platform.machine()} {os.cpu_count()} cores", "backend": jax.default_backend(),
              "date": datetime.date.today().isoformat(), "jax": jax.__version__,
              "extractor_test_accuracy": quality.report.get("test_accuracy")}
    lines = JsonLines(BENCH, args.out, common)

    def emit(sampler, steps, metric, value, unit, **extra):
        lines(sampler=sampler, steps=steps, metric=metric, value=value, unit=unit, **extra)

    def run(name, steps, fn, params, **extra):
        """Draws every sample with ``fn(params, text, z, key)`` in batches, times one batch, scores."""
        B = args.batch
        key = jax.random.key(args.seed)
        first = jax.block_until_ready(fn(params, jnp.asarray(text_all[:B]), jnp.asarray(z_all[:B]), key))
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(params, jnp.asarray(text_all[:B]), jnp.asarray(z_all[:B]), key))
            times.append(time.perf_counter() - t0)
        outs = [np.asarray(first)]
        for i in range(B, n, B):
            outs.append(np.asarray(fn(params, jnp.asarray(text_all[i:i + B]), jnp.asarray(z_all[i:i + B]),
                                      jax.random.fold_in(key, i))))
        samples = np.concatenate(outs)[:n]
        s = quality.score(samples, labels)
        emit(name, steps, "fid", s["fid"], "", **extra)
        emit(name, steps, "class_acc", s["class_acc"], "fraction", **extra)
        emit(name, steps, "sample_ms", statistics.median(times) * 1e3, "ms", batch=min(B, n), **extra)
        print(f"[{BENCH}] {name} {steps} steps (guidance {extra.get('guidance_scale')}): fid {s['fid']:.2f}, "
              f"class acc {s['class_acc']:.3f}, {statistics.median(times) * 1e3:.0f} ms / {min(B, n)} images",
              file=sys.stderr)
        return s

    def ddim_fn(steps, g):
        @jax.jit
        def f(params, text, z, key):
            return sample_clips(model, params, text, tcfg.diffusion, None, steps=steps, guidance_scale=g, z_T=z)
        return f

    with lines:
        for g in args.guidance or (tcfg.diffusion.guidance_scale,):
            run("teacher_ddim", args.teacher_steps, ddim_fn(args.teacher_steps, g), teacher, guidance_scale=g)
            for k in args.steps:
                run("ddim", k, ddim_fn(k, g), teacher, guidance_scale=g)
        for d, cfg, scfg, smodel, student, sstep in students:
            # an MLCM student is also sampled deterministically on its segment boundaries (row "mlcm_mcm")
            samplers = [(cfg.method, None)] + ([("mlcm_mcm", "mcm")] if cfg.method == "mlcm" else [])
            for name, sampler in samplers:
                for k in args.steps:
                    try:
                        fn = make_sampler(cfg, smodel, scfg, k, sampler=sampler)
                    except ValueError as e:
                        print(f"[{BENCH}] {name} cannot sample with {k} steps: {e}", file=sys.stderr)
                        continue
                    run(name, k, fn, student, student_run=d, student_step=int(sstep),
                        guidance_scale=cfg.distill_guidance(scfg))
    return lines.rows


if __name__ == "__main__":
    main()
