"""Fixtures shared by the test files: a micro expert pool built once per test session.

The micro pool has the tiny architecture, four quick tasks and short recipes (the same code as
`karcher-lab zoo build`), so it builds in seconds on two cores. Sweep, widget and notebook tests use it
instead of the full tiny pool, which takes minutes to build.
"""
from __future__ import annotations

import pytest
import torch

from karcher_lab.zoo import build_pool, config_for

MICRO_POOL = dict(tasks=("double", "units", "dates", "uppercase"), pretrain_steps=100, finetune_steps=120,
                  eval_examples=40, pretrain_examples_per_task=300, finetune_examples=1000)


@pytest.fixture(scope="session")
def micro_pool(tmp_path_factory):
    """A built :class:`karcher_lab.zoo.Pool` of 4 experts (double, units, dates, uppercase) and its base."""
    return build_pool(config_for("tiny", **MICRO_POOL), tmp_path_factory.mktemp("micro_pool_cache"),
                      workers=2, progress=False)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: the micro pool's models are tiny, one thread is fastest, and
    multithreaded BLAS stalls on shared cores (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
