"""`torchrun -m metapo_fast.train [--config FILE.yaml] [section.field=value ...]`

With no arguments it runs the embedded default: a tiny Llama, a synthetic addition preference task
with 30% flipped labels, an SFT warm-up that produces the reference model, then MetaPO; it prints
a summary (clean held-out accuracy, AUROC of the learned weights for flipped vs clean pairs,
meta-update overhead, tokens/s) and the run directory. `python -m metapo_fast.train` works too
(one process).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys

from ..config import ConfigError, load_config

def _default_config() -> str:
    from .. import configs  # the repository's configs/, installed as metapo_fast.configs

    return os.path.join(os.path.dirname(os.path.abspath(configs.__file__)), "default.yaml")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m metapo_fast.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML config (default: the embedded tiny run)")
    ap.add_argument("--resume", default=None, help="checkpoint directory, or 'auto' (same as train.resume=...)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.beta=0.2 meta.enabled=false")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    try:
        cfg = load_config(args.config or _default_config(), overrides, user_yaml=args.config is not None)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"metapo_fast.train: invalid configuration: {exc}", file=sys.stderr)
        return 2
    import torch

    if cfg.train.device == "cpu" or not torch.cuda.is_available():
        # DeepSpeed (imported by transformers' integrations too) otherwise warns on every process that
        # it "was unable to detect" a GPU; CPU is what it would pick anyway
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from ..data.formats import InvalidDataError
    from .loop import NonFiniteError, Trainer
    from .parallel import destroy, init_distributed

    dist = init_distributed(cfg.train.dist_timeout_s, cfg.train.device)
    try:
        try:
            cfg.validate(dist.world_size)
        except (ConfigError, ValueError) as exc:
            print(f"metapo_fast.train: invalid configuration: {exc}", file=sys.stderr)
            return 2
        from ..extras import MissingExtraError, require
        from .parallel import uses_deepspeed

        try:  # an optional package this configuration needs: say which extra, before anything runs
            if uses_deepspeed(cfg, dist.world_size):
                require("deepspeed")
            if cfg.model.use_liger_kernels:
                require("liger_kernel")
        except MissingExtraError as exc:
            print(f"metapo_fast.train: {exc}", file=sys.stderr)
            return 2
        created = not os.path.exists(cfg.train.output_dir)
        try:
            Trainer(cfg, dist).train()
        except InvalidDataError as exc:  # bad input: one line naming the file and rows, and no empty run directory
            print(f"metapo_fast.train: invalid data: {exc}", file=sys.stderr)
            if created and dist.rank == 0:
                shutil.rmtree(cfg.train.output_dir, ignore_errors=True)
            return 2
    except NonFiniteError as exc:
        print(f"metapo_fast.train: {exc}", file=sys.stderr)
        return 3
    finally:
        destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
