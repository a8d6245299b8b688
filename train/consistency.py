"""Distil a few-step student from a DiT teacher run:
``python -m train.consistency --config configs/cd_fmnist_mcd.yaml [--resume] [--overwrite] [key=value ...]``.

``method`` is ``mcd`` (multistep consistency distillation), ``lcm``, ``mlcm`` (data-free, teacher trajectories) or
``scott`` (η-DDIM teacher with sub-steps and an adversarial term); see ``jaxeff.methods.consistency.trainer``.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.consistency", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML file with a ConsistencyConfig")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("--overwrite", action="store_true", help="discard an earlier run's checkpoints")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=50")
    args = parser.parse_intermixed_args(argv)

    from jaxeff.config import ConfigError, load_config
    from jaxeff.methods.consistency.trainer import ConsistencyConfig, train_consistency

    try:
        cfg = load_config(ConsistencyConfig, args.config, args.overrides)
        result = train_consistency(cfg, resume=args.resume, overwrite=args.overwrite)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"run_dir": result.run_dir, "steps": result.final_step,
                      "final_loss": result.losses.get(result.final_step), "wall_time_s": round(result.wall_time_s, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
