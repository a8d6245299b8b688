"""Efficient-vDiT end to end on a video DiT run:
``python -m train.efficient_vdit --config configs/efficient_vdit_tiny.yaml [--resume] [--overwrite] [key=value ...]``.

Stage 1 distils the teacher into a few-step multistep-consistency student; stage 2 searches an Attention Tile mask
per layer on that student; stage 3 distils the dense student into its sparse self. Prints and writes
``report.json``: k per layer, attention sparsity, and for the teacher's default sampler and each student the
Fréchet distance, caption accuracy, sampling time and speedup (see ``jaxeff.methods.efficient_vdit``).
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.efficient_vdit", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML file with an EfficientVDiTConfig")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted stage")
    parser.add_argument("--overwrite", action="store_true", help="redo a finished or started run in output_dir")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. stage1.train.steps=50 kd.steps=20")
    args = parser.parse_intermixed_args(argv)

    from jaxeff.config import ConfigError, load_config
    from jaxeff.methods.efficient_vdit import EfficientVDiTConfig, run_efficient_vdit

    try:
        cfg = load_config(EfficientVDiTConfig, args.config, args.overrides)
        report = run_efficient_vdit(cfg, resume=args.resume, overwrite=args.overwrite)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {k: report[k] for k in ("layer_k", "attention_sparsity", "speedup", "steps_x_attention_speedup",
                                      "fd_change_vs_teacher")}
    summary["fd"] = {k: round(v["fd"], 3) for k, v in report["scores"].items()}
    summary["caption_acc"] = {k: round(v["caption_acc"], 3) for k, v in report["scores"].items()}
    summary["sample_s"] = {k: round(v["sample_s"], 2) for k, v in report["scores"].items()}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
