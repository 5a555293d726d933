"""Run ``tests/scripts/load_adapters.py``: load saved adapters in a fresh interpreter, with or without the plugin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

LOADER = Path(__file__).resolve().parent / "scripts" / "load_adapters.py"


def start_loader(base: Path, inputs: Path, out: Path, adapters: list[Path], plugin: bool = False) -> subprocess.Popen:
    """Start the loader (see its docstring); :func:`loader_result` waits for it. Several may run at once."""
    argv = [sys.executable, str(LOADER), str(base), str(inputs), str(out), *map(str, adapters)]
    return subprocess.Popen(
        argv + (["--plugin"] if plugin else []),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def loader_result(process: subprocess.Popen, timeout: float = 300) -> dict:
    """The loader's ``RESULT`` JSON; fails the test with its stderr if it did not finish cleanly."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    assert process.returncode == 0, stderr[-3000:]
    line = next(line for line in stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def load_adapters(base: Path, inputs: Path, out: Path, adapters: list[Path], plugin: bool = False) -> dict:
    """Run the loader and return its result."""
    return loader_result(start_loader(base, inputs, out, adapters, plugin))
