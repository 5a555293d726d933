import pytest
import torch

import peft_adaptive  # noqa: F401  (registers ADAPTIVE_LORA with PEFT)


@pytest.fixture(scope="session", autouse=True)
def single_thread():
    # Tiny models run as fast on one thread, and one thread avoids OpenMP spin-waits that slow every op
    # by orders of magnitude when the 2-core CI machine is shared (measured: 3.5 s vs 20 ms per step).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
