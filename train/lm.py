"""Train a decoder LM: ``python -m train.lm --config configs/lm_tiny.yaml [--resume] [--overwrite] [key=value ...]``.

``key=value`` overrides any config field (``train.steps=50``, ``optim.lr=1e-3``, ``mesh.data=2``,
``model.dtype=bfloat16``). ``--resume`` continues from the latest finalised checkpoint in ``output_dir`` (exactly:
same data order, optimizer state and RNG); ``--overwrite`` discards the checkpoints of an earlier run there.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.lm", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML file with a TrainConfig")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("--overwrite", action="store_true", help="start over, deleting earlier checkpoints")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=50")
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after the flags

    from jaxeff.config import ConfigError, load_config
    from jaxeff.training import TrainConfig, train

    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
        train(cfg, resume=args.resume, overwrite=args.overwrite)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
