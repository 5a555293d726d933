"""``peft_adaptive.distributed.rewrap_ddp``: what the DDP re-initialisation after a resize keeps and refuses.

``tests/scripts/ddp_rewrap.py`` builds real ``DistributedDataParallel`` wrappers in one gloo process (in a
subprocess, so this test process never holds a process group); the two-process behaviour is checked in
``test_callback.py::test_ddp_processes_stay_identical_after_reallocation``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "scripts" / "ddp_rewrap.py"


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("rewrap") / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_settings_hooks_and_flags_are_kept(report):
    kept = report["kept"]
    # the counting communication hook and the forward pre-hook on the wrapper ran after the re-initialisation
    assert kept["comm_calls"] == 1 and kept["forward_calls"] == 1
    assert kept["new_param_has_grad"] and kept["new_param_in_reducer"]
    assert kept["same_process_group"] and kept["find_unused_parameters"] and kept["gradient_as_bucket_view"]
    assert kept["bucket_bytes_cap"] == 3 * 1024 * 1024 and kept["broadcast_buffers"] is False and kept["training"]
    other = report["kept_other"]
    assert other == {
        "default_first_bucket_kept": True,
        "bucket_list_kept": True,
        "static_graph": True,
        "device_mesh_kept": True,
        "powersgd_memory_before": 2,
        "powersgd_memory_after": 0,  # its per-bucket memories described the old buckets
        "powersgd_hook_kept": True,
        "eval_kept": True,
        "not_ddp": True,
    }


@pytest.mark.parametrize(
    "setting, named",
    [
        ("builtin_hook", "built-in communication hook"),
        ("delay_all_reduce", "delay_all_reduce_named_params"),
        ("fused_optim", "fused optimizer"),
        ("mixed_precision", "DDP mixed_precision"),
    ],
)
def test_what_cannot_be_kept_is_refused_with_what_to_do(report, setting, named):
    message = report["refused"][setting]
    assert named in message
    assert "Either build the DistributedDataParallel wrapper without it" in message
    assert "PeftModel.from_pretrained(base, path, is_trainable=True)" in message


def test_update_and_allocate_reinitialises_the_wrapper_it_is_given(report):
    assert report["adaptive"] == {"reallocation_step": 2, "reducer_holds_the_trainable_parameters": True}
