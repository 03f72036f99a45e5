"""Ranks of one machine share its cores: each rank's torch threads are its share, unless OMP_NUM_THREADS
says otherwise (DeepSpeed's launcher leaves every rank one thread per core)."""
import os

import torch

from seesaw_ds.distributed.builder import share_cores


def test_each_rank_takes_its_share_of_the_cores(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(cores)
        monkeypatch.setenv("LOCAL_SIZE", "2")
        share_cores()
        assert torch.get_num_threads() == max(1, cores // 2)
        torch.set_num_threads(cores)
        monkeypatch.setenv("LOCAL_SIZE", "1")          # one rank: all of them
        share_cores()
        assert torch.get_num_threads() == cores
        monkeypatch.setenv("LOCAL_SIZE", "2")
        monkeypatch.setenv("OMP_NUM_THREADS", str(cores))   # the user's setting stands
        share_cores()
        assert torch.get_num_threads() == cores
    finally:
        torch.set_num_threads(before)
