"""Train a video DiT teacher: ``python -m train.vdit --config configs/vdit_tiny.yaml [--resume] [k=v ...]``.

The model is a Wan 2.1-style DiT (``jaxeff.models.vdit``) trained on the embedded moving-shapes clips. ``key=value``
overrides any config field (``train.steps=50``, ``model.num_layers=2``, ``data.frames=4``). ``--resume`` continues
from the latest finalised checkpoint in ``output_dir`` exactly; ``--overwrite`` discards an earlier run's
checkpoints.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.vdit", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML file with a VDiTTrainConfig")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("--overwrite", action="store_true", help="start over, deleting earlier checkpoints")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=50")
    args = parser.parse_intermixed_args(argv)

    from jaxeff.config import ConfigError, load_config
    from jaxeff.training.vdit import VDiTTrainConfig, train_vdit

    try:
        cfg = load_config(VDiTTrainConfig, args.config, args.overrides)
        result = train_vdit(cfg, resume=args.resume, overwrite=args.overwrite)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[vdit] done in {result.wall_time_s:.1f} s: held-out loss {result.eval_loss:.4f}, "
          f"x0 mse {result.eval_x0_mse:.4f}, {result.clips_per_s:.1f} clips/s -> {result.run_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
