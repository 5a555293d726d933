"""A ``Trainer`` run with ``AdaptiveLoraCallback`` that the fault tests kill with SIGKILL.

    python tests/scripts/train_until_killed.py OUT [KILL]

Trains the same tiny model as ``tests/test_faults.py`` (seeded; one thread, so bit-identical to the test process),
saving a checkpoint at every step into OUT and printing ``STEP <n>`` after each optimizer step. KILL makes the
process SIGKILL itself at a chosen point: ``trainer-save:<step>`` while ``Trainer`` saves that step's checkpoint
(after the weights and optimizer, before ``trainer_state.json``), ``plugin-save:<step>`` while the callback writes
its state file into it (after the temporary file, before the rename). Without KILL, the test kills it from outside.
"""

import os
import signal
import sys
from pathlib import Path

import torch


def main(argv: list[str]) -> None:
    out = argv[0]
    kill = argv[1] if len(argv) > 1 else None
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.test_faults import train_run
    from transformers import TrainerCallback, TrainerState

    class Announce(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            print(f"STEP {state.global_step}", flush=True)

    if kill:
        where, step = kill.split(":")
        step = int(step)
        if where == "trainer-save":
            original = TrainerState.save_to_json

            def save_to_json(self, path):
                if self.global_step == step:
                    os.kill(os.getpid(), signal.SIGKILL)
                return original(self, path)

            TrainerState.save_to_json = save_to_json
        elif where == "plugin-save":
            original_replace = os.replace

            def replace(src, dst, *args, **kwargs):
                if str(dst).endswith(os.path.join(f"checkpoint-{step}", "adaptive_lora_state.pt")):
                    os.kill(os.getpid(), signal.SIGKILL)
                return original_replace(src, dst, *args, **kwargs)

            os.replace = replace
        else:
            raise SystemExit(f"unknown kill point {kill!r}")
    train_run(out, extra_callbacks=[Announce()])
    print("DONE", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
