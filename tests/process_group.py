"""Run ``torchrun`` from a test and never leave its worker processes behind."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys

import pytest


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run_process_group(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own session and kill the whole group on timeout or failure.

    ``subprocess.run(timeout=...)`` only kills torchrun itself; its worker processes would outlive the test.
    """
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{stderr[-3000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers of a failed run
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def torchrun(script: str, *args: str, processes: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node processes script *args`` on CPU (one thread per process), killed as a group."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    result = run_process_group([*cmd, "--master_port", free_port(), script, *args], env, timeout)
    if result.returncode != 0 and _died_in_native_code(result.stderr):
        # Seen now and then on the 2-core machine (2 of about 40 torchrun runs): a gloo worker aborts in C++ ("terminate called
        # without an active exception") before any Python code fails. One retry on a fresh port; a Python error
        # (a real failure) exits with code 1 and is never retried.
        print(f"torchrun worker aborted in native code; retrying once:\n{result.stderr[-1500:]}", file=sys.stderr)
        result = run_process_group([*cmd, "--master_port", free_port(), script, *args], env, timeout)
    return result


def _died_in_native_code(stderr: str) -> bool:
    return "(SIGABRT)" in stderr or "(SIGSEGV)" in stderr
