"""The dry run's step-time estimate runs with the thread count the run will train with."""

from __future__ import annotations

import torch

from medkd.config import build_config
from medkd.workflows.study_cost import _bench


class ThreadProbe(torch.nn.Module):
    """A 1x1 convolution that records torch's intra-op thread count at every forward."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 1)
        self.threads: list[int] = []

    def forward(self, x):
        self.threads.append(torch.get_num_threads())
        return self.conv(x)


def _cfg(num_threads):
    return build_config({"data": {"mode": "2d", "patch_size": [8, 8], "batch_size": 2},
                         "train": {"num_threads": num_threads, "max_steps": 1}})


def test_bench_steps_with_the_runs_thread_count_and_restores_the_callers():
    before = torch.get_num_threads()
    probe = ThreadProbe()
    seconds = _bench(probe, _cfg(1), channels=1, classes=2, backward=True, repeats=2)
    assert seconds > 0 and probe.threads == [1, 1, 1]
    assert torch.get_num_threads() == before


def test_bench_without_a_thread_count_keeps_the_callers():
    before = torch.get_num_threads()
    probe = ThreadProbe()
    _bench(probe, _cfg(None), channels=1, classes=2, backward=False, repeats=1)
    assert probe.threads == [before, before]
