"""The ``--busy`` condition of the benchmarks: a competing torch process on the same cores.

The competitor multiplies two 2048×2048 float32 matrices in a loop on ``threads`` torch threads (the
load of another merge, an evaluation or a training job), from before the timed runs start until they
end. :func:`load_average` is what every benchmark prints next to its figures.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from typing import ContextManager, Iterator

COMPETITOR = """
import torch
torch.set_num_threads({threads})
a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
print("ready", flush=True)
while True:
    a @ b
"""


@contextmanager
def competing_process(threads: int = 2) -> Iterator[subprocess.Popen]:
    """A process doing large matmuls on ``threads`` torch threads for the duration of the block."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.Popen([sys.executable, "-c", COMPETITOR.format(threads=threads)], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the competing torch process did not start")
        time.sleep(0.5)  # its threads are up and multiplying
        yield proc
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def busy_if(busy: bool, threads: int = 2) -> ContextManager:
    """:func:`competing_process` when ``busy``, else nothing."""
    return competing_process(threads) if busy else nullcontext()


def load_average() -> float:
    """The 1-minute load average (all processes on the machine, ours included)."""
    return os.getloadavg()[0]
