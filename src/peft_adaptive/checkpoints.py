"""Crash-safe files: atomic writes, and finding the newest *complete* ``Trainer`` checkpoint.

transformers (5.x) writes a checkpoint straight into ``checkpoint-<step>`` (no temporary folder, no rename), and
``transformers.trainer_utils.get_last_checkpoint`` returns the highest-numbered folder whether or not it was
finished. A process killed while saving leaves a half-written folder that ``resume_from_checkpoint=True`` would
pick. ``AdaptiveLoraCallback.on_save`` runs after ``Trainer`` has written everything else (model, optimizer,
scheduler, RNG state, ``trainer_state.json``) and writes ``adaptive_lora_state.pt`` atomically, so in a run with
the callback that file marks a complete checkpoint: :func:`last_complete_checkpoint` returns the newest folder
that has it, and the callback refuses to resume from one that has not.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

#: The callback's state file; written last into each checkpoint, atomically (see the module docstring).
CHECKPOINT_MARKER = "adaptive_lora_state.pt"
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write a file so that ``path`` holds either its old content or the complete new one, never a part.

    ``write`` gets a binary file object in the same folder; it is flushed and fsynced, then renamed over
    ``path`` with ``os.replace`` (atomic on POSIX and Windows within one file system).
    """
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def is_complete_checkpoint(folder: str | os.PathLike) -> bool:
    """True if ``folder`` is a checkpoint that ``Trainer`` and the callback finished writing."""
    folder = Path(folder)
    return (folder / CHECKPOINT_MARKER).is_file() and (folder / TRAINER_STATE).is_file()


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-<step>`` folder of ``output_dir`` that was completely written, or None.

    Use it instead of ``resume_from_checkpoint=True`` (which takes the newest folder, finished or not):
    ``trainer.train(resume_from_checkpoint=last_complete_checkpoint(args.output_dir))``. Keep
    ``save_total_limit`` at 2 or more (or None): ``Trainer`` deletes older checkpoints before the newest is complete.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    steps = sorted(
        (int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))
    )
    for _, folder in reversed(steps):
        if is_complete_checkpoint(folder):
            return str(folder)
    return None
