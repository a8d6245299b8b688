"""Efficient-vDiT stages 2 and 3 on a video DiT run:
``python -m train.vdit_sparse --config configs/vdit_sparse_tiny.yaml [--resume] [--overwrite] [key=value ...]``.

Stage 2 searches the Attention Tile mask of every layer (``search.threshold`` = r on the relative output error);
stage 3 distils the dense teacher into the sparse student. Prints and writes ``report.json``: k per layer, attention
sparsity, output error against the teacher before/after distillation, and sample quality (Fréchet distance in a
moving-shapes feature space, caption accuracy) of the teacher, the sparse model and the distilled student.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.vdit_sparse", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML file with a TileSparseConfig")
    parser.add_argument("--resume", action="store_true", help="reuse search.json and continue the distillation")
    parser.add_argument("--overwrite", action="store_true", help="redo a finished run in output_dir")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. kd.steps=50")
    args = parser.parse_intermixed_args(argv)

    from jaxeff.config import ConfigError, load_config
    from jaxeff.methods.tile_sparse.pipeline import TileSparseConfig, run_tile_sparse

    try:
        cfg = load_config(TileSparseConfig, args.config, args.overrides)
        report = run_tile_sparse(cfg, resume=args.resume, overwrite=args.overwrite)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {k: report[k] for k in ("layer_k", "attention_sparsity", "output_rel_err_before_kd",
                                      "output_rel_err_after_kd", "fd_change_vs_teacher")}
    summary["fd"] = {k: round(v["fd"], 3) for k, v in report["scores"].items()}
    summary["caption_acc"] = {k: round(v["caption_acc"], 3) for k, v in report["scores"].items()}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
