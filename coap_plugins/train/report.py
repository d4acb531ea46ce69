"""Read ``coap-train`` run folders and turn them into Markdown reports and plots.

A run folder (written by :class:`~coap_plugins.train.outputs.RunLog`) holds ``summary.json``
and ``metrics.jsonl``; this module only reads them:

- :func:`load_run`: parse one folder into a :class:`Run`;
- :func:`plot_curves`: training loss and the headline eval metric against the step;
- :func:`summary_table`: a Markdown table, one row per run;
- :func:`write_report`: ``RUN/report.md`` and ``RUN/curves.png`` for one run;
- :func:`compare`: ``comparison.md`` and ``comparison.png`` for several runs of one task;
- :func:`main`: the ``coap-report DIR [DIR ...] [--out OUT_DIR]`` console script.

Nothing heavy is imported at module level; matplotlib (``Agg`` backend) is imported by the
plotting function only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Run",
    "compare",
    "format_bytes",
    "format_metric",
    "load_run",
    "main",
    "plot_curves",
    "summary_table",
    "write_report",
]

SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
REQUIRED_KEYS = ("name", "task", "metric")
MISSING = "n/a"
_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
_MIB = 2.0**-20
# peak_memory_kind in summary.json -> (short label for tables, what the figure is)
PEAK_KINDS = {
    "cuda_max_allocated": (
        "CUDA max allocated",
        "`torch.cuda.max_memory_allocated`: the most tensor memory the CUDA allocator handed out",
    ),
    "cpu_peak_rss": ("CPU peak RSS", "peak resident set (VmHWM on Linux): all the process held, interpreter included"),
}
_RANKS_LISTED = 4  # table cells list up to this many ranks' figures, a min-max range past it


@dataclass
class Run:
    """One ``coap-train`` run folder, parsed.

    Attributes:
        path: the run folder.
        summary: the object in ``summary.json``.
        train: the ``"split": "train"`` rows of ``metrics.jsonl``, in file order.
        eval: the ``"split": "eval"`` rows of ``metrics.jsonl``, in file order.
    """

    path: Path
    summary: dict[str, Any]
    train: list[dict[str, Any]] = field(default_factory=list)
    eval: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The run name from the summary."""
        return str(self.summary["name"])

    @property
    def task(self) -> str:
        """The task (``"classification"`` or ``"ddpm"``)."""
        return str(self.summary["task"])

    @property
    def metric(self) -> str:
        """The headline eval metric's name (e.g. ``"accuracy"``, ``"heldout_loss"``)."""
        return str(self.summary["metric"])


# --------------------------------------------------------------------------- loading


def _read_summary(path: Path) -> dict[str, Any]:
    """Parse and check ``summary.json`` in the run folder ``path``."""
    file = path / SUMMARY_FILE
    if not file.is_file():
        raise FileNotFoundError(f"No run found in {path}: expected {SUMMARY_FILE} (written by coap-train)")
    try:
        summary = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{file} is not valid JSON ({exc.msg} at line {exc.lineno}); expected the object written by coap-train"
        ) from exc
    if not isinstance(summary, dict):
        raise ValueError(f"{file} holds a {type(summary).__name__}; expected a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in summary]
    if missing:
        raise ValueError(f"{file} lacks the keys {missing}; expected at least {list(REQUIRED_KEYS)}")
    return summary


def _read_metrics(file: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split ``metrics.jsonl`` into ``(train rows, eval rows)``; rows of other splits are ignored."""
    train: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    if not file.is_file():
        return train, evals
    with file.open() as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{file}, line {lineno}: malformed JSON ({exc.msg}); expected one JSON object per line"
                ) from exc
            if not isinstance(row, dict):
                raise ValueError(f"{file}, line {lineno}: got a {type(row).__name__}; expected a JSON object")
            if row.get("split") == "train":
                train.append(row)
            elif row.get("split") == "eval":
                evals.append(row)
    return train, evals


def load_run(path: str | Path) -> Run:
    """Load a run folder written by ``coap-train``.

    Args:
        path: the run folder, holding ``summary.json`` and (optionally) ``metrics.jsonl``.

    Returns:
        The parsed :class:`Run`; ``train`` and ``eval`` are empty when ``metrics.jsonl`` is absent.

    Raises:
        FileNotFoundError: the folder or its ``summary.json`` does not exist.
        ValueError: ``summary.json`` is not a JSON object with ``name``, ``task`` and ``metric``,
            or a line of ``metrics.jsonl`` is not a JSON object (the message names the line).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"No run folder at {path}: expected a directory written by coap-train")
    summary = _read_summary(path)
    train, evals = _read_metrics(path / METRICS_FILE)
    return Run(path=path, summary=summary, train=train, eval=evals)


# --------------------------------------------------------------------------- formatting


def format_bytes(n: int | float) -> str:
    """Human-readable binary size: ``0 -> "0 B"``, ``1536 -> "1.50 KiB"``, ``3 * 2**20 -> "3.00 MiB"``.

    Args:
        n: a byte count (non-negative).

    Raises:
        ValueError: ``n`` is negative or not finite.
    """
    if not math.isfinite(n) or n < 0:
        raise ValueError(f"format_bytes needs a finite, non-negative byte count, got {n!r}")
    if n < 1024:
        return f"{int(n)} B"
    value = float(n)
    unit = 0
    while unit < len(_BYTE_UNITS) - 1 and round(value, 2) >= 1024:
        value /= 1024
        unit += 1
    return f"{value:.2f} {_BYTE_UNITS[unit]}"


def _is_fraction_metric(name: str) -> bool:
    """Whether the metric is a fraction in [0, 1] best shown as a percentage."""
    return "acc" in name.lower()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_metric(name: str, value: float | None) -> str:
    """Format a metric value: accuracies as ``"98.33 %"``, anything else to 4 significant digits.

    Args:
        name: the metric name (names containing ``"acc"`` are shown as percentages).
        value: the value; ``None`` (or a non-number) gives ``"n/a"``, NaN gives ``"nan"``.
    """
    if not _is_number(value):
        return MISSING
    if math.isnan(value):
        return "nan"
    if _is_fraction_metric(name):
        return f"{100 * value:.2f} %"
    return f"{value:.4g}"


def _fixed(value: Any, digits: int = 1, scale: float = 1.0) -> str:
    """``value * scale`` with ``digits`` decimals, or ``"n/a"`` for a missing value."""
    return f"{value * scale:.{digits}f}" if _is_number(value) else MISSING


def _ratio(num: Any, den: Any, percent: bool = False) -> str:
    """``num / den`` as ``"0.50x"`` (or ``"50.0 %"``), or ``"n/a"`` when either is missing or ``den`` is 0."""
    if not (_is_number(num) and _is_number(den)) or den == 0 or not math.isfinite(num / den):
        return MISSING
    return f"{100 * num / den:.1f} %" if percent else f"{num / den:.2f}x"


def _md_cell(text: Any) -> str:
    """Escape a value for a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


# --------------------------------------------------------------------------- run values


def _headline(run: Run) -> float | None:
    """The final value of the run's headline metric (from ``final``, else the last eval row)."""
    final = run.summary.get("final") or {}
    if _is_number(final.get(run.metric)):
        return float(final[run.metric])
    for row in reversed(run.eval):
        if _is_number(row.get(run.metric)):
            return float(row[run.metric])
    return None


def _eval_loss(run: Run) -> float | None:
    """The final eval ``loss`` when the run reports one besides its headline metric."""
    final = run.summary.get("final") or {}
    value = final.get("loss")
    return float(value) if _is_number(value) else None


def _seconds_per_step(run: Run) -> float | None:
    """Wall seconds per optimizer step (evaluation included), or None when unknown."""
    wall, steps = run.summary.get("wall_seconds"), run.summary.get("steps")
    if not (_is_number(wall) and _is_number(steps)) or steps <= 0:
        return None
    return wall / steps


def _byte_count(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value) and value >= 0


def _peak_memory(run: Run) -> tuple[float | None, list[float] | None, str | None]:
    """``(peak bytes, per-rank peaks or None, kind or None)`` from the summary.

    The peak is ``peak_memory_bytes`` (the largest rank's), else the largest of
    ``peak_memory_per_rank``; summaries written before the per-rank list and the kind existed
    give ``None`` for them, as do malformed values.
    """
    s = run.summary
    ranks = s.get("peak_memory_per_rank")
    if not (isinstance(ranks, list) and ranks and all(_byte_count(v) for v in ranks)):
        ranks = None
    peak = s.get("peak_memory_bytes")
    if not _byte_count(peak):
        peak = max(ranks) if ranks else None
    kind = s.get("peak_memory_kind")
    return peak, ranks, kind if isinstance(kind, str) and kind else None


def _peak_cell(run: Run) -> str:
    """The peak in MiB; for several ranks, the per-rank figures (``"200.0 (ranks 150.0 / 200.0)"``)
    or, past :data:`_RANKS_LISTED` ranks, their range (``"200.0 (8 ranks, 150.0-200.0)"``)."""
    peak, ranks, _ = _peak_memory(run)
    text = _fixed(peak, scale=_MIB)
    if peak is None or ranks is None or len(ranks) < 2:
        return text
    if len(ranks) <= _RANKS_LISTED:
        return f"{text} (ranks {' / '.join(_fixed(v, scale=_MIB) for v in ranks)})"
    return f"{text} ({len(ranks)} ranks, {_fixed(min(ranks), scale=_MIB)}-{_fixed(max(ranks), scale=_MIB)})"


def _peak_kind_label(kind: str | None) -> str:
    """The table label of a ``peak_memory_kind`` (an unknown kind as it is, a missing one ``"n/a"``)."""
    if kind is None:
        return MISSING
    return PEAK_KINDS[kind][0] if kind in PEAK_KINDS else kind


def _labels(runs: Sequence[Run]) -> list[str]:
    """Run names, with the folder name appended where names repeat (the full path if that repeats too)."""
    counts = Counter(r.name for r in runs)
    labels = [f"{r.name} ({r.path.name})" if counts[r.name] > 1 else r.name for r in runs]
    again = Counter(labels)
    return [f"{r.name} ({r.path})" if again[lab] > 1 else lab for r, lab in zip(runs, labels)]


def _common_task(runs: Sequence[Run]) -> str:
    """The task shared by all runs.

    Raises:
        ValueError: ``runs`` is empty or mixes tasks (the message names them).
    """
    if not runs:
        raise ValueError("Need at least one run, got none")
    tasks = sorted({r.task for r in runs})
    if len(tasks) > 1:
        found = ", ".join(f"{r.name}: {r.task}" for r in runs)
        raise ValueError(f"Cannot compare runs of different tasks {tasks} ({found}); give runs of one task")
    return tasks[0]


# --------------------------------------------------------------------------- table


def _columns(runs: Sequence[Run], relative: bool) -> list[str]:
    """Header of :func:`summary_table`."""
    metrics = {r.metric for r in runs}
    cols = ["run", "trainer", "optimizer"]
    cols.append(next(iter(metrics)) if len(metrics) == 1 else "metric")
    if any(_eval_loss(r) is not None and r.metric != "loss" for r in runs):
        cols.append("eval loss")
    cols += ["optimizer state", "state / full rank", "steps", "samples/s", "wall (s)", "peak memory (MiB)"]
    if any(_peak_memory(r)[2] is not None for r in runs):
        cols.append("peak kind")
    if relative:
        cols += ["metric vs first", "state vs first", "time/step vs first"]
    return cols


def _row(run: Run, label: str, cols: list[str], first: Run) -> list[str]:
    """One table row for ``run``; relative cells compare with ``first``."""
    s = run.summary
    value = format_metric(run.metric, _headline(run))
    state = s.get("state_bytes")
    cells = {
        "run": label,
        "trainer": s.get("trainer", MISSING),
        "optimizer": s.get("optimizer", MISSING),
        "metric": f"{run.metric} {value}",
        run.metric: value,
        "eval loss": format_metric("loss", _eval_loss(run)),
        "optimizer state": format_bytes(state) if _is_number(state) and state >= 0 else MISSING,
        "state / full rank": _ratio(state, s.get("full_rank_state_bytes"), percent=True),
        "steps": str(s["steps"]) if _is_number(s.get("steps")) else MISSING,
        "samples/s": _fixed(s.get("samples_per_second")),
        "wall (s)": _fixed(s.get("wall_seconds")),
        "peak memory (MiB)": _peak_cell(run),
        "peak kind": _peak_kind_label(_peak_memory(run)[2]),
        "metric vs first": _ratio(_headline(run), _headline(first)),
        "state vs first": _ratio(state, first.summary.get("state_bytes")),
        "time/step vs first": _ratio(_seconds_per_step(run), _seconds_per_step(first)),
    }
    return [_md_cell(cells[c]) for c in cols]


def summary_table(runs: Sequence[Run], *, relative: bool = False) -> str:
    """A Markdown table with one row per run.

    Columns: run name, trainer, optimizer class, the headline metric (headed by its name; when
    the runs use different metrics, a ``metric`` column reads e.g. ``"accuracy 98.33 %"``), the
    eval ``loss`` when any run reports one besides its metric, optimizer-state size, state as a
    share of the full-rank (two fp32 moments) equivalent, steps, samples/s, wall seconds,
    peak memory in MiB (the largest rank's; for runs of several ranks followed by the per-rank
    figures in rank order, or their min-max range past four ranks) and, when any run records
    it, the kind of peak figure (``"CUDA max allocated"`` or ``"CPU peak RSS"``; ``"n/a"`` for
    runs that predate it).

    Args:
        runs: the runs, in row order.
        relative: append the headline metric, state bytes and wall seconds per step relative to
            the first run (``"1.00x"`` for the first).

    Raises:
        ValueError: ``runs`` is empty.
    """
    if not runs:
        raise ValueError("summary_table needs at least one run, got none")
    cols = _columns(runs, relative)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for run, label in zip(runs, _labels(runs)):
        lines.append("| " + " | ".join(_row(run, label, cols, runs[0])) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plots


def _finite_points(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of the rows holding finite numbers for both ``step`` and ``key``."""
    steps: list[float] = []
    values: list[float] = []
    for row in rows:
        step, value = row.get("step"), row.get(key)
        if _is_number(step) and _is_number(value) and math.isfinite(value):
            steps.append(float(step))
            values.append(float(value))
    return steps, values


def _ema(values: list[float], weight: float) -> list[float]:
    """Exponential moving average ``s_t = weight * s_{t-1} + (1 - weight) * x_t`` with ``s_0 = x_0``."""
    out: list[float] = []
    for x in values:
        out.append(x if not out else weight * out[-1] + (1 - weight) * x)
    return out


def _plot_train(ax: Any, runs: Sequence[Run], labels: list[str], smoothing: float) -> None:
    """Training loss (smoothed) against the step, one line per run."""
    drawn: list[float] = []
    for run, label in zip(runs, labels):
        steps, losses = _finite_points(run.train, "loss")
        if steps:
            ax.plot(steps, _ema(losses, smoothing), label=label)
            drawn += losses
    title = "training loss" + (f" (EMA {smoothing:g})" if smoothing else "")
    _finish_panel(ax, title, "loss", drawn)
    if drawn and min(drawn) > 0:
        ax.set_yscale("log")


def _plot_eval(ax: Any, runs: Sequence[Run], labels: list[str]) -> None:
    """The headline eval metric against the step, one line per run."""
    metric = runs[0].metric
    scale = 100.0 if _is_fraction_metric(metric) else 1.0
    drawn: list[float] = []
    for run, label in zip(runs, labels):
        steps, values = _finite_points(run.eval, metric)
        if steps:
            ax.plot(steps, [v * scale for v in values], marker="o", markersize=3, label=label)
            drawn += values
    goal = runs[0].summary.get("metric_goal")
    better = {"max": ", higher is better", "min": ", lower is better"}.get(goal, "")
    _finish_panel(ax, f"eval {metric}{better}", metric + (" (%)" if scale != 1.0 else ""), drawn)


def _finish_panel(ax: Any, title: str, ylabel: str, drawn: list[float]) -> None:
    """Title, labels, grid, and a legend (or a note when nothing was drawn)."""
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no rows", ha="center", va="center", transform=ax.transAxes)


def plot_curves(runs: Sequence[Run], out_png: str | Path, *, smoothing: float = 0.6) -> Path:
    """Plot training loss and the headline eval metric against the step into one PNG.

    Left panel: training loss, smoothed with an exponential moving average of weight
    ``smoothing`` (log scale when all losses are positive).  Right panel: the headline eval
    metric (accuracies in percent), unsmoothed.  One line per run, labelled by run name
    (the folder name is appended to repeated names).  Non-finite values are left out.

    Args:
        runs: runs of one task.
        out_png: the PNG to write (its folder is created); written at 120 dpi.
        smoothing: EMA weight in ``[0, 1)``; 0 plots the raw losses.

    Returns:
        The path of the PNG.

    Raises:
        ValueError: no runs, runs of different tasks, or ``smoothing`` outside ``[0, 1)``.
    """
    _common_task(runs)
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    labels = _labels(runs)
    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    try:
        _plot_train(ax_train, runs, labels, smoothing)
        _plot_eval(ax_eval, runs, labels)
        fig.tight_layout()
        fig.savefig(out, dpi=120)
    finally:
        plt.close(fig)
    return out


# --------------------------------------------------------------------------- reports


def _describe(run: Run) -> str:
    """One line naming the task, model, trainer, precision and world size."""
    s = run.summary
    parts = [
        f"task `{run.task}`",
        f"model `{s.get('model', MISSING)}`",
        f"trainer `{s.get('trainer', MISSING)}`",
        f"optimizer `{s.get('optimizer', MISSING)}`" + (" (COAP)" if s.get("coap") else ""),
        f"precision `{s.get('precision', MISSING)}`",
        f"world size {s.get('world_size', MISSING)}",
    ]
    if _is_number(s.get("params")):
        parts.append(f"{s['params']:,} parameters")
    return ", ".join(parts)


def _warnings(run: Run) -> list[str]:
    """Lines for what makes the numbers untrustworthy: a diverged run, layers that never set up."""
    s = run.summary
    lines = []
    diverged = s.get("diverged")
    if isinstance(diverged, dict):
        loss, step = format_metric("loss", diverged.get("loss")), diverged.get("step", MISSING)
        if diverged.get("stopped"):
            lines.append(
                f"**Diverged**: the training loss was {loss} at step {step}; training stopped there "
                "(`stop_on_nonfinite: true`)."
            )
        else:
            lines.append(
                f"**Diverged**: the training loss was first {loss} at step {step}; training went on "
                "(`stop_on_nonfinite: false`)."
            )
    waiting = s.get("waiting_layers") or []
    if waiting:
        n = len(waiting)
        names = ", ".join(f"`{w}`" for w in waiting[:5]) + (", ..." if n > 5 else "")
        lines.append(
            f"**{n} projected layer{'s' if n > 1 else ''} never received a usable gradient**: "
            f"{'their' if n > 1 else 'its'} state is not counted in the optimizer state below ({names})."
        )
    return lines


def _memory_lines(run: Run) -> list[str]:
    """Bullets for report.md: the optimizer state against its full-rank equivalent, then the peak
    memory with every rank's figure (several ranks) and what kind of figure it is."""
    s = run.summary
    state, full = s.get("state_bytes"), s.get("full_rank_state_bytes")
    state_line = "- optimizer state: " + (format_bytes(state) if _byte_count(state) else MISSING)
    if _byte_count(state) and _byte_count(full) and full > 0:
        state_line += f" ({_ratio(state, full, percent=True)} of the full-rank equivalent, {format_bytes(full)})"
    peak, ranks, kind = _peak_memory(run)
    peak_line = "- peak memory: " + (format_bytes(peak) if peak is not None else MISSING)
    if ranks is not None and len(ranks) > 1:
        each = ", ".join(f"rank {i}: {format_bytes(v)}" for i, v in enumerate(ranks))
        peak_line += f", the largest of {len(ranks)} ranks ({each})"
    if kind is None:
        peak_line += f"; kind: {MISSING}"
    elif kind in PEAK_KINDS:
        peak_line += f"; kind: {PEAK_KINDS[kind][0]} ({PEAK_KINDS[kind][1]})"
    else:
        peak_line += f"; kind: {kind}"
    return [state_line, peak_line]


def write_report(run_dir: str | Path) -> Path:
    """Write ``RUN/report.md`` and ``RUN/curves.png`` for one run folder.

    The report holds a title with the run name, a line describing the run, a warning when the
    run diverged (``diverged`` in the summary) or COAP layers never set up (``waiting_layers``),
    the one-row :func:`summary_table`, the optimizer-state bytes next to the peak memory (every
    rank's figure when there are several, and what kind of figure it is), links to the config
    file and the curves, and the sample grid image when the summary names one (``sample_grid``).

    Args:
        run_dir: the run folder written by ``coap-train``.

    Returns:
        The path of ``report.md``.

    Raises:
        FileNotFoundError: see :func:`load_run`.
        ValueError: see :func:`load_run`.
    """
    run = load_run(run_dir)
    curves = plot_curves([run], run.path / "curves.png")
    config = run.summary.get("config") or "config.yaml"
    lines = [
        f"# {run.name}",
        "",
        _describe(run),
        "",
        *(line for warning in _warnings(run) for line in (warning, "")),
        summary_table([run]).rstrip("\n"),
        "",
        *_memory_lines(run),
        f"- config: [{config}]({config})",
        f"- curves: [{curves.name}]({curves.name})",
        "",
        f"![training curves]({curves.name})",
    ]
    grid = run.summary.get("sample_grid")
    if grid:
        lines += ["", "## Samples", "", f"![sample grid]({grid})"]
    report = run.path / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def _best_line(runs: Sequence[Run], labels: list[str]) -> str | None:
    """A sentence naming the run with the best headline metric, or None when none has a value."""
    goal = runs[0].summary.get("metric_goal", "max")
    scored = [(v, lab) for r, lab in zip(runs, labels) if (v := _headline(r)) is not None and not math.isnan(v)]
    if not scored:
        return None
    value, label = (max if goal == "max" else min)(scored, key=lambda pair: pair[0])  # ties: earliest run
    metric = runs[0].metric
    return (
        f"Best {metric} ({'higher' if goal == 'max' else 'lower'} is better): {label}, {format_metric(metric, value)}."
    )


def _peak_note(runs: Sequence[Run]) -> str:
    """A sentence on the peak memory column: whose figure it is and what the recorded kinds measure."""
    kinds = sorted({k for r in runs if (k := _peak_memory(r)[2]) is not None})
    note = (
        "Peak memory is the largest rank's; runs of several ranks add the per-rank figures in rank "
        f"order (their min-max range past {_RANKS_LISTED} ranks)."
    )
    described = [f"{PEAK_KINDS[k][0]} is {PEAK_KINDS[k][1]}" for k in kinds if k in PEAK_KINDS]
    if described:
        note += " " + "; ".join(described) + "."
    if any(_peak_memory(r)[2] is None for r in runs):
        note += f" Runs whose summary does not record the kind show {MISSING}."
    return note


def compare(run_dirs: Sequence[str | Path], out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Compare runs of one task: write ``comparison.md`` and ``comparison.png`` into ``out_dir``.

    The Markdown holds :func:`summary_table` with relative columns (headline metric, state
    bytes and wall seconds per step divided by the first run's), a note on the peak-memory
    figures (the largest rank's, per-rank figures for multi-rank runs, the kinds of figure), the
    best run by the headline metric, and the curves of all runs.

    Args:
        run_dirs: run folders; the first is the reference for the relative columns.
        out_dir: where to write (created if needed); the current directory by default.

    Returns:
        ``(comparison.md path, comparison.png path)``.

    Raises:
        FileNotFoundError: a run folder or its ``summary.json`` is missing.
        ValueError: no run folders, a malformed file, or runs of different tasks.
    """
    if not run_dirs:
        raise ValueError("compare needs at least one run folder, got none")
    runs = [load_run(d) for d in run_dirs]
    _common_task(runs)
    out = Path(out_dir) if out_dir is not None else Path.cwd()
    png = plot_curves(runs, out / "comparison.png")
    labels = _labels(runs)
    lines = [f"# Comparison of {len(runs)} {runs[0].task} runs", ""]
    lines += [f"- {lab}: `{r.path}` ({r.summary.get('optimizer', MISSING)})" for r, lab in zip(runs, labels)]
    lines += [
        "",
        f"Relative columns divide by the first run ({labels[0]}); time/step is wall seconds per optimizer step.",
        "",
        _peak_note(runs),
        "",
    ]
    lines.append(summary_table(runs, relative=True).rstrip("\n"))
    best = _best_line(runs, labels)
    if best:
        lines += ["", best]
    lines += ["", f"![training curves]({png.name})"]
    md = out / "comparison.md"
    md.write_text("\n".join(lines) + "\n")
    return md, png


# --------------------------------------------------------------------------- CLI


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coap-report",
        description="Write report.md for one coap-train run folder, or compare several runs "
        "(comparison.md and comparison.png).",
    )
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="run folders written by coap-train")
    parser.add_argument(
        "--out",
        metavar="OUT_DIR",
        default=None,
        help="write comparison.md / comparison.png here (default: the current directory)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``coap-report`` console script; returns the exit status (2 on bad input)."""
    args = _build_parser().parse_args(argv)
    try:
        if len(args.dirs) == 1 and args.out is None:
            report = write_report(args.dirs[0])
            print(summary_table([load_run(args.dirs[0])]), end="")
            print(f"wrote {report}")
            return 0
        md, png = compare(args.dirs, args.out)
        print(summary_table([load_run(d) for d in args.dirs], relative=True), end="")
    except (OSError, ValueError) as exc:
        print(f"coap-report: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {md}\nwrote {png}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
