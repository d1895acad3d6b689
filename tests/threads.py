"""One intra-op thread for in-process training tests.

Their models are tiny, so one thread is as fast as two; and on a busy 2-core machine a 2-thread OpenMP loop
waits at every small op for its descheduled second thread (measured: up to 20x slower), as each DDP process
would if it had two."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """Run the block with `torch.set_num_threads(1)`, and restore the previous count after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
