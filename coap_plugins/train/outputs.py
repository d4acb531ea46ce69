"""What a ``coap-train`` run writes into ``output_dir`` (framework-free; the runners feed it).

- ``config.yaml``: the resolved recipe;
- ``metrics.jsonl``: one JSON object per line, ``{"split": "train", "step", "epoch", "loss",
  "lr", "time"}`` every ``log_interval`` optimizer steps and ``{"split": "eval", "step",
  "epoch", "time", <metrics>}`` after each evaluation (``epoch``: epochs completed);
  ``time`` is seconds since this process started training.  A resumed run drops the rows past
  its checkpoint and appends;
- ``summary.json``: final metrics, optimizer-state bytes against the full-rank equivalent,
  throughput, wall time, peak memory, ``diverged`` (the first step whose training loss was not
  finite, or null) and ``waiting_layers`` (COAP-projected parameters that never received a
  usable gradient, so hold no state yet) (read by :mod:`coap_plugins.train.report`).  Peak
  memory is three keys: ``peak_memory_per_rank``, every rank's peak in bytes in rank order
  (gathered by :func:`peak_memory_per_rank`; one entry for a single process),
  ``peak_memory_bytes``, the largest of them, and ``peak_memory_kind``, what the figures
  measure: ``"cuda_max_allocated"`` (``torch.cuda.max_memory_allocated`` on the training GPU:
  tensors the CUDA caching allocator handed out, not what it reserved) or ``"cpu_peak_rss"``
  (the process's peak resident set, ``VmHWM`` on Linux, else ``getrusage``: everything the
  process held, the Python interpreter and libraries included).  Summaries written before the last two keys existed hold
  ``peak_memory_bytes`` alone (this process's figure);
- ``report.md`` and ``curves.png`` (and ``samples.png`` for DDPM).

Only global rank 0 writes.
"""

from __future__ import annotations

import json
import math
import numbers
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig, to_yaml

__all__ = ["RunLog", "optimizer_state_bytes", "peak_memory_bytes", "peak_memory_kind", "peak_memory_per_rank"]


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """``(bytes of the optimizer's state tensors, full-rank AdamW-style equivalent)``.

    COAP optimizers count their own state (projectors, projected or quantized moments) and the
    full-rank equivalent (two fp32 moments per element); for other optimizers the state tensors
    are summed and the equivalent is the same two-moment count, so every run is measured against
    the same yardstick.
    """
    from ..optim import CoapOptimizer

    if isinstance(optimizer, CoapOptimizer):
        return optimizer.state_bytes(), optimizer.full_rank_state_bytes()
    used = sum(
        v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)
    )
    full = sum(8 * p.numel() for g in optimizer.param_groups for p in g["params"])
    return used, full


def peak_memory_bytes(device: torch.device | None = None) -> int:
    """Peak memory of this process: CUDA allocator peak on a GPU, else the peak resident set.

    On Linux the resident peak is ``VmHWM`` of ``/proc/self/status``: the high-water mark of this
    process's own memory.  ``getrusage``'s ``ru_maxrss`` (the fallback) also carries over the
    peak of the process that launched this one (Linux keeps it across ``exec``), so a DDP rank
    started from a large parent would report at least the parent's peak.
    """
    if device is not None and device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def peak_memory_kind(device: torch.device | None = None) -> str:
    """What :func:`peak_memory_bytes` measures on ``device``: ``"cuda_max_allocated"`` or ``"cpu_peak_rss"``."""
    return "cuda_max_allocated" if device is not None and device.type == "cuda" else "cpu_peak_rss"


def _gather_device(device: torch.device | None) -> torch.device:
    """Where the tensor of an ``all_gather`` on the default group must live: a CUDA device when the
    group only speaks NCCL, the CPU otherwise (gloo, MPI, or a ``cpu:gloo,cuda:nccl`` pair)."""
    import torch.distributed as dist

    backend = str(dist.get_backend()).lower()
    cpu_capable = "gloo" in backend or "mpi" in backend or "cpu:" in backend
    if "nccl" in backend and not cpu_capable:
        if device is not None and device.type == "cuda":
            return device
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def peak_memory_per_rank(device: torch.device | None = None) -> list[int]:
    """Every rank's :func:`peak_memory_bytes` on ``device``, in rank order.

    When ``torch.distributed`` is initialized with more than one process, the figures are
    gathered over the default group with an ``all_gather`` of one int64 per rank (on the CUDA
    device for NCCL, on the CPU for gloo), so this is a collective: call it on every rank at the
    same point, or the ranks that do call it hang until the process group times out.  Otherwise
    it is ``[this process's peak]``.  Each rank measures its own peak before the gather, so the gather's own buffers are
    not counted.
    """
    own = peak_memory_bytes(device)
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return [own]
    mine = torch.tensor([own], dtype=torch.int64, device=_gather_device(device))
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return [int(t.item()) for t in gathered]


def _clean(value: Any) -> Any:
    if torch.is_tensor(value):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return value  # json writes NaN / Infinity, which json.loads reads back
    return value


class RunLog:
    """Writes the run folder; every method is a no-op on ranks other than 0."""

    def __init__(self, cfg: TrainConfig, rank: int = 0, *, resuming: bool = False) -> None:
        self.cfg = cfg
        self.active = rank == 0
        self.dir = Path(cfg.output_dir or ".")
        self.start = time.perf_counter()
        self.eval_seconds = 0.0
        self.last_eval: dict[str, float] = {}
        self.last_eval_step = -1
        # the first non-finite training loss: {"step", "loss", "stopped"}
        self.diverged: dict[str, Any] | None = None
        if not self.active:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.yaml").write_text(to_yaml(cfg))
        self.metrics_path = self.dir / "metrics.jsonl"
        if not resuming:  # a resumed run calls truncate(step) once the checkpoint is loaded
            self.truncate(None)

    def truncate(self, resumed_step: int | None) -> None:
        """Start ``metrics.jsonl`` afresh, or keep only rows up to ``resumed_step``."""
        if not self.active:
            return
        rows: list[str] = []
        if resumed_step is not None and self.metrics_path.is_file():
            for line in self.metrics_path.read_text().splitlines():
                if line.strip() and json.loads(line).get("step", 0) <= resumed_step:
                    rows.append(line)
        self.metrics_path.write_text("".join(r + "\n" for r in rows))

    def _write(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def train_row(self, step: int, epoch: int, loss: float, lr: float) -> None:
        first_bad = self.diverged is None and not math.isfinite(loss)
        if first_bad:
            self.diverged = {"step": step, "loss": loss, "stopped": self.cfg.stop_on_nonfinite}
        if self.active and (step % self.cfg.log_interval == 0 or first_bad):
            self._write(
                {"split": "train", "step": step, "epoch": epoch, "loss": loss, "lr": lr, "time": self.elapsed()}
            )

    def stopped_diverged(self, step: int, loss: float) -> None:
        """Training stopped at ``step`` because a loss (this rank's or another's) was not finite."""
        if self.diverged is None:
            self.diverged = {"step": step, "loss": loss, "stopped": True}

    def eval_row(self, step: int, epoch: int, metrics: dict[str, float], seconds: float) -> None:
        self.eval_seconds += seconds
        self.last_eval = {k: float(_clean(v)) for k, v in metrics.items()}
        self.last_eval_step = step
        if self.active:
            self._write({"split": "eval", "step": step, "epoch": epoch, "time": self.elapsed(), **self.last_eval})

    def finish(
        self,
        *,
        optimizer: torch.optim.Optimizer,
        params: int,
        steps: int,
        steps_this_run: int,
        samples_per_step: int,
        world_size: int,
        device: torch.device | None,
        sample_grid: str | None = None,
        peak_per_rank: list[int] | None = None,
    ) -> dict[str, Any] | None:
        """Write ``summary.json`` and ``report.md``; returns the summary (None off rank 0).

        ``peak_per_rank``: every rank's peak memory in bytes, in rank order, from
        :func:`peak_memory_per_rank` (a collective, so every rank calls it before this method,
        which does nothing off rank 0); None records this process's figure alone.  The summary's
        ``peak_memory_bytes`` is their maximum, ``peak_memory_per_rank`` the list and
        ``peak_memory_kind`` what they measure on ``device`` (see the module docstring).

        Raises:
            ValueError: ``peak_per_rank`` is empty or holds something other than non-negative
                integers.
        """
        if not self.active:
            return None
        if peak_per_rank is None:
            peak_per_rank = [peak_memory_bytes(device)]
        peaks = list(peak_per_rank)
        if not peaks or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0 for v in peaks):
            raise ValueError(
                f"peak_per_rank must list every rank's peak memory as non-negative integer bytes "
                f"(from peak_memory_per_rank), got {peak_per_rank!r}"
            )
        peaks = [int(v) for v in peaks]
        wall = self.elapsed()
        train_seconds = max(wall - self.eval_seconds, 1e-9)
        state, full = optimizer_state_bytes(optimizer)
        waiting = optimizer.waiting_parameters() if hasattr(optimizer, "waiting_parameters") else []
        task = self.cfg.task.name
        summary = {
            "name": self.cfg.name,
            "trainer": self.cfg.trainer,
            "task": task,
            "model": self.cfg.model.name,
            "optimizer": type(optimizer).__name__,
            "coap": self.cfg.coap is not None,
            "metric": "accuracy" if task == "classification" else "heldout_loss",
            "metric_goal": "max" if task == "classification" else "min",
            "final": self.last_eval,
            "final_step": self.last_eval_step,
            "state_bytes": state,
            "full_rank_state_bytes": full,
            "waiting_layers": waiting,
            "diverged": self.diverged,
            "params": params,
            "steps": steps,
            "samples_per_second": steps_this_run * samples_per_step / train_seconds,
            "wall_seconds": wall,
            "peak_memory_bytes": max(peaks),
            "peak_memory_per_rank": peaks,
            "peak_memory_kind": peak_memory_kind(device),
            "world_size": world_size,
            "precision": self.cfg.precision,
            "sample_grid": sample_grid,
            "config": "config.yaml",
        }
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        from .report import write_report

        write_report(self.dir)
        return summary
