"""engines.dask.map_blocks on the real LocalCluster: results, progress, retries, errors."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

from scdist.engines.dask import map_blocks


class Count:
    def __init__(self):
        self.n = 0

    def update(self, n=1):
        self.n += n


def _square_sum(block, scale=1):
    a, b = block
    return scale * int((np.arange(a, b) ** 2).sum())


def test_all_blocks_returned_with_their_results(dask_client):
    blocks = [(i, i + 10) for i in range(0, 100, 10)]
    bar = Count()
    out = dict(map_blocks(dask_client, _square_sum, blocks, progress=bar, scale=2))
    assert set(out) == set(blocks)
    assert sum(out.values()) == 2 * int((np.arange(100) ** 2).sum())
    assert bar.n == len(blocks)


def _sleepy(block):
    time.sleep(block)
    return block


def test_results_arrive_in_completion_order(dask_client):
    # 2 workers: whichever worker does not hold the slow block finishes a fast one first
    order = [b for b, _ in map_blocks(dask_client, _sleepy, [3.0, 0.0, 0.0])]
    assert order[0] == 0.0 and sorted(order) == [0.0, 0.0, 3.0]


def _flaky(block, flag_dir):
    # fails the first time each block runs, succeeds on Dask's retry
    flag = os.path.join(flag_dir, f"seen-{block}")
    if not os.path.exists(flag):
        open(flag, "w").close()
        raise OSError("transient")
    return block


def test_retries_absorb_transient_failures(dask_client, tmp_path):
    out = sorted(r for _, r in map_blocks(dask_client, _flaky, range(4), retries=1,
                                          flag_dir=str(tmp_path)))
    assert out == [0, 1, 2, 3]


def test_failure_after_retries_raises(dask_client, tmp_path):
    with pytest.raises(OSError, match="transient"):
        list(map_blocks(dask_client, _flaky, range(3), retries=0, flag_dir=str(tmp_path)))
