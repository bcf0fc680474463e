"""What a run shows and records: terminal lines (rank 0 only), MFU, the peak-FLOPs table,
Weights & Biases (only with --run), a metrics JSONL beside the checkpoints, and a PNG plot."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

# Peak dense BF16 tensor FLOP/s (no sparsity) from the vendors' data sheets. Matched by substring of
# torch.cuda.get_device_name(), most specific first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2.5e15), ("B200", 2.25e15), ("B100", 1.75e15),
    ("H200", 989e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12),
    ("GH200", 989e12), ("H20", 148e12),
    ("A100", 312e12), ("A800", 312e12), ("A10G", 70e12), ("A10", 125e12), ("A6000", 155e12), ("A40", 150e12),
    ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
    ("RTX 6000 Ada", 364e12), ("RTX PRO 6000", 500e12),
    ("5090", 209e12), ("4090", 165e12), ("3090", 71e12),
    ("MI300X", 1307e12), ("MI325X", 1307e12), ("MI250X", 383e12),
)


def peak_flops(device_name: str) -> float | None:
    """Peak BF16 FLOP/s of a GPU by name, or None when unknown (MFU is then not shown)."""
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.2f}h"


def mfu(flops_per_token: float, tokens_per_sec: float, peak: float | None, world_size: int) -> float | None:
    """Model FLOPs utilization in percent of the devices' peak BF16 rate."""
    if not peak:
        return None
    return 100.0 * flops_per_token * tokens_per_sec / (peak * world_size)


def step_line(step: int, num_iterations: int, loss: float, lrm: float, dt: float, tok_per_sec: float,
              mfu_pct: float | None, elapsed: float, eta: float | None, skipped: int | None = None) -> str:
    """The per-step terminal line. skipped: steps the fp16 gradient scaler skipped so far (None: no scaler)."""
    parts = [
        f"step {step:05d}/{num_iterations:05d} ({100 * step / max(num_iterations, 1):.1f}%)",
        f"loss {loss:.4f}", f"lrm {lrm:.2f}", f"dt {dt * 1000:.0f}ms", f"tok/s {tok_per_sec:,.0f}",
    ]
    if mfu_pct is not None:
        parts.append(f"mfu {mfu_pct:.1f}%")
    if skipped is not None:
        parts.append(f"skipped {skipped}")
    parts.append(f"time {format_duration(elapsed)}")
    if eta is not None:
        parts.append(f"eta {format_duration(eta)}")
    return " | ".join(parts)


class Monitor:
    """Rank 0's voice: prints, wandb (only if `run` is not 'dummy'), metrics JSONL and a plot.

    Other ranks get a Monitor that does nothing, so callers never test the rank themselves.
    """

    def __init__(self, *, master: bool, run: str = "dummy", out_dir: Path | None = None,
                 config: dict | None = None, project: str = "nanotrain") -> None:
        self.master = master
        self.out_dir = Path(out_dir) if out_dir else None
        self.run, self.config, self.project = run, config, project
        self._wandb = None
        self.history: list[dict] = []

    def start(self, resume_step: int | None = None, wandb_id: str | None = None) -> None:
        """Open the records, once the run's up-front checks have passed (a refused run must leave an earlier
        run's log alone). A fresh run starts a fresh metrics log. A resumed run keeps the rows its checkpoint
        covers: every row before resume_step, and the evaluations the earlier run logged at resume_step (they
        ran right after the checkpoint was written; `logged` tells the resumed run not to repeat them); rows of
        an abandoned timeline past it are dropped, so the log and the plot read as one uninterrupted run. Then
        wandb, when --run is set: a resume continues the wandb run `wandb_id`."""
        if not self.master:
            return
        if self.out_dir:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if resume_step is None:
                self.metrics_path.unlink(missing_ok=True)
            elif self.metrics_path.exists():
                rows = []
                for line in self.metrics_path.read_text().splitlines():
                    try:
                        rows.append(json.loads(line))
                    except ValueError:  # a row cut short by a crash mid-write (or a blank line): dropped
                        pass
                self.history = [r for r in rows if r.get("step", 0) < resume_step or
                                (r.get("step") == resume_step and "train/loss" not in r)]
                tmp = self.metrics_path.with_name(f".metrics.{os.getpid()}.jsonl")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
                os.replace(tmp, self.metrics_path)
        if self.run != "dummy":
            try:
                import wandb
            except ImportError:
                from nanotrain.errors import UserError
                raise UserError("--run needs the wandb package: `pip install wandb` (or leave --run out)")
            self._wandb = wandb.init(project=self.project, name=self.run, config=self.config, id=wandb_id,
                                     resume="allow" if resume_step is not None else None)

    def logged(self, step: int, key: str) -> bool:
        """Whether the log holds a value of `key` at `step` (rank 0 only: other ranks keep no log)."""
        return any(r.get("step") == step and r.get(key) is not None for r in self.history)

    @property
    def wandb_id(self) -> str | None:
        """The wandb run's id (checkpoints keep it so that a resume logs to the same run)."""
        return self._wandb.id if self._wandb is not None else None

    @property
    def metrics_path(self) -> Path:
        assert self.out_dir is not None
        return self.out_dir / "metrics.jsonl"

    def print(self, *args, **kwargs) -> None:
        if self.master:
            print(*args, **kwargs, flush=True)

    def warn(self, message: str) -> None:
        if self.master:
            print(f"WARNING: {message}", file=sys.stderr, flush=True)

    def log(self, metrics: dict) -> None:
        """Record one row of metrics (must include 'step') to JSONL and wandb."""
        if not self.master:
            return
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        row.setdefault("time", time.time())
        self.history.append(row)
        if self.out_dir:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in metrics.items() if k != "time"})

    def plot(self) -> Path | None:
        """Write loss and val bpb against step and against training time to plot.png (atomic)."""
        if not self.master or not self.out_dir:
            return None
        train = [r for r in self.history if "train/loss" in r]
        val = [r for r in self.history if "val/bpb" in r and r["val/bpb"] is not None]
        if not train and not val:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(2, 2, figsize=(11, 7))
        for col, xkey, xlabel in ((0, "step", "step"), (1, "total_training_time", "training time (s)")):
            ax = axes[0][col]
            pts = [(r[xkey], r["train/loss"]) for r in train if r.get(xkey) is not None]
            if pts:
                ax.plot(*zip(*pts), lw=1)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("train loss")
            ax.grid(alpha=0.3)
            ax = axes[1][col]
            pts = [(r[xkey], r["val/bpb"]) for r in val if r.get(xkey) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", lw=1)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("val bpb")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = self.out_dir / "plot.png"
        tmp = self.out_dir / f".plot.{os.getpid()}.png"
        fig.savefig(tmp, dpi=90)
        plt.close(fig)
        os.replace(tmp, path)
        return path

    def finish(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
