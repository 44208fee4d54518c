"""Run logging: one rank-0 line per logged step, ``metrics.jsonl`` (flushed per line, so a crash
loses nothing already logged), TensorBoard scalars when tensorboard is installed, and a progress
bar. Other ranks get a :class:`NullLogger`, so call sites never test the rank."""
from __future__ import annotations

import json
import math
import os
import sys

__all__ = ["RunLogger", "NullLogger", "make_logger"]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


class RunLogger:
    """Writes metrics under ``run_dir`` with TRL's metric names (loss, rewards/chosen, ...)."""

    CONSOLE_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "metapo/weight_std", "lr", "tokens_per_s", "step_time_s",
                    "eval/accuracy", "eval/margin", "metapo/L_val")

    def __init__(self, run_dir: str, total_steps: int, tensorboard: bool = True, progress: bool = True, resume: bool = False):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._f = open(self.path, "a" if resume else "w", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra: metrics.jsonl still has everything
                self._tb = None
            else:
                self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        self._bar = None
        if progress and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, desc="train", dynamic_ncols=True)

    def log(self, step: int, metrics: dict, console: bool = True) -> None:
        rec = {"step": step, **{k: (float(v) if hasattr(v, "__float__") and not isinstance(v, (int, str)) else v)
                                for k, v in metrics.items()}}
        self._f.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
        if console:
            shown = " ".join(f"{k}={_fmt(rec[k])}" for k in self.CONSOLE_KEYS if k in rec)
            msg = f"step {step}: {shown}"
            if self._bar is not None:
                self._bar.write(msg)
            else:
                print(msg, flush=True)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def info(self, msg: str) -> None:
        if self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._f.close()


class NullLogger:
    def log(self, step: int, metrics: dict, console: bool = True) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def info(self, msg: str) -> None:
        pass

    def close(self) -> None:
        pass


def make_logger(is_main: bool, run_dir: str, total_steps: int, resume: bool = False, tensorboard: bool = True) -> "RunLogger | NullLogger":
    return RunLogger(run_dir, total_steps, tensorboard=tensorboard, resume=resume) if is_main else NullLogger()
