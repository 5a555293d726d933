"""Reallocation scores from what training left behind: a saved allocation or ``Trainer`` logs.

``AdaptiveLoraCallback`` logs each module's score as ``adaptive_lora/score/<module>`` through
``Trainer.log``, so they end up in ``trainer_state.json`` (``log_history``) and in JSON-lines loggers; the
adapter's ``allocation`` (in ``adaptive_lora.json`` or the config) holds them as parallel lists.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .adapter_files import AdapterError

#: Prefix of the per-module scores that ``AdaptiveLoraCallback`` logs through ``Trainer.log``.
LOGGED_SCORE_PREFIX = "adaptive_lora/score/"


def scores_from_allocation(allocation: dict[str, Any]) -> dict[str, float] | None:
    """``{module: score}`` from an allocation's ``names`` and ``scores`` lists; None if it has none."""
    names, scores = allocation.get("names"), allocation.get("scores")
    if isinstance(names, list) and isinstance(scores, list) and len(names) == len(scores) and names:
        return {str(n): float(s) for n, s in zip(names, scores)}
    return None


def scores_from_logs(path: str | os.PathLike) -> dict[str, float]:
    """Reallocation scores from training logs.

    ``path`` may be a ``trainer_state.json`` (its ``log_history`` holds the ``adaptive_lora/score/<module>``
    values that ``AdaptiveLoraCallback`` logs), a folder holding one (a checkpoint or output folder), a JSON
    file with an ``allocation`` (such as ``adaptive_lora.json``), or a JSON-lines log. The last reallocation
    found wins. Raises :class:`AdapterError` when there is none.
    """
    file = Path(path)
    if file.is_dir():
        file = file / "trainer_state.json"
    if not file.is_file():
        raise AdapterError(f"{path}: no such log file (pass a trainer_state.json, a folder holding one, or a JSON log)")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{file} is not a readable text file: {exc}") from exc
    try:
        documents = [json.loads(text)]
    except json.JSONDecodeError:
        documents = []
        for line in text.splitlines():
            try:
                documents.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        if not documents:
            raise AdapterError(f"{file} is neither JSON nor JSON lines") from None
    found = None
    for document in documents:
        found = _last_scores(document) or found
    if not found:
        raise AdapterError(f"{file} holds no reallocation scores (no {LOGGED_SCORE_PREFIX}* values or allocation)")
    return found


def _last_scores(value: Any) -> dict[str, float] | None:
    """The last set of scores in a JSON value: an allocation dict or flat ``adaptive_lora/score/...`` keys."""
    found = None
    if isinstance(value, dict):
        flat = {
            k[len(LOGGED_SCORE_PREFIX) :]: float(v)
            for k, v in value.items()
            if k.startswith(LOGGED_SCORE_PREFIX) and isinstance(v, (int, float))
        }
        if flat:
            found = flat
        elif "names" in value and "scores" in value:
            found = scores_from_allocation(value)
        for child in value.values():
            found = _last_scores(child) or found
    elif isinstance(value, list):
        for child in value:
            found = _last_scores(child) or found
    return found
