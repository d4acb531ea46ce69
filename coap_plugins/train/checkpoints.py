"""Which checkpoint a resumed ``coap-train`` run loads: the newest one in the folder that reads.

A run killed while writing (or a full disk) can leave a truncated newest checkpoint beside
intact older ones, and both frameworks then stop with a raw ``PytorchStreamReader failed
reading zip archive``.  Checkpoints of both frameworks are torch zip archives: reading the
archive's directory and checking every member's CRC (``zipfile.ZipFile.testzip``) finds
truncated and corrupt files at the cost of one read, without unpickling anything.
"""

from __future__ import annotations

import sys
import zipfile
from collections.abc import Iterable
from pathlib import Path

__all__ = ["resume_checkpoint", "unreadable_reason"]


def unreadable_reason(path: Path) -> str | None:
    """Why the checkpoint ``path`` cannot be loaded, or None when it is a whole zip archive."""
    if not path.is_file():
        return "missing"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        return f"truncated or corrupt: {exc}"
    return f"corrupt: archive member {bad} fails its CRC check" if bad is not None else None


def resume_checkpoint(
    folder: Path, newest: Path | None, others: Iterable[Path], *, announce: bool = True
) -> Path | None:
    """The checkpoint to resume from, or None when ``folder`` holds none (a fresh start).

    ``newest`` is the one the framework would load (Composer's ``latest`` symlink target,
    Lightning's ``last.ckpt``); when it cannot be read, the newest of ``others`` (by modification
    time) that can is chosen, with one line on stderr naming the skipped files (when ``announce``:
    on rank 0).

    Raises:
        ValueError: there are checkpoints and none of them can be read.
    """
    seen = {newest.resolve()} if newest is not None else set()
    older = sorted((p for p in others if p.is_file() and p.resolve() not in seen), key=_age, reverse=True)
    candidates = ([newest] if newest is not None else []) + older
    bad: list[tuple[Path, str]] = []
    for path in candidates:
        reason = unreadable_reason(path)
        if reason is None:
            if bad and announce:
                print(
                    f"coap-train: warning: {_names(bad)} cannot be read ({bad[0][1]}); resuming from {path}, "
                    "the newest checkpoint that loads",
                    file=sys.stderr,
                )
            return path
        bad.append((path, reason))
    if not bad:
        return None
    raise ValueError(
        f"No checkpoint in {folder} can be read to resume from: {_names(bad)} ({bad[0][1]}); remove "
        f"{'it' if len(bad) == 1 else 'them'} or set checkpoint.resume=false to start afresh"
    )


def _age(path: Path) -> tuple[int, str]:
    return path.stat().st_mtime_ns, path.name


def _names(bad: list[tuple[Path, str]]) -> str:
    return ("checkpoint " if len(bad) == 1 else "checkpoints ") + ", ".join(str(p) for p, _ in bad)
