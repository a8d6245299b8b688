"""Train Attention-Gate: ``python -m train.attention_gate --config X.yaml [--resume] [--overwrite] [key=value ...]``.

Two jobs, told apart by the config (``jaxeff.training.attention_gate.load_job_config``):

* **CPT** (a ``TrainConfig`` with an ``attention_gate:`` section, e.g. ``configs/ag_tiny_cpt.yaml``): continual
  pre-training of the gates on the KJV corpus with the base model frozen (``train.trainable: methods``); prints the
  held-out perplexity of the base model and of the gated model with its eviction ratio, and saves the gates alone in
  ``<output_dir>/gates``.
* **SFT** (a top-level ``task:`` section, e.g. ``configs/ag_tiny_sft.yaml``): fine-tunes on KJV book classification
  with and without gates; prints the accuracy of both and the eviction ratio of the gated one.

``key=value`` overrides any config field; ``--resume`` continues from the latest checkpoint(s) in ``output_dir``;
``--overwrite`` discards earlier checkpoints there.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.attention_gate", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML file: a TrainConfig with attention_gate (CPT) or an "
                                                        "SFTConfig (task section)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("--overwrite", action="store_true", help="start over, deleting earlier checkpoints")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=50")
    args = parser.parse_intermixed_args(argv)

    from jaxeff.config import ConfigError
    from jaxeff.training.attention_gate import load_job_config, run_job

    try:
        cfg = load_job_config(args.config, args.overrides)
        run_job(cfg, resume=args.resume, overwrite=args.overwrite)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
