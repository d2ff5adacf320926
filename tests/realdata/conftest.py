"""Fixtures for the real-data tests."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: more threads only add overhead on 2 shared cores
    yield
    torch.set_num_threads(threads)
