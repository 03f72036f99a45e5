"""Shared memory and temp files are private and never left behind: the host KV store is created 0600 and
refuses an existing path or a planted symlink; a store larger than /dev/shm is one clear error naming
kv.host_gb and the free space (not SIGBUS), on every rank, with no file left and the process group undone;
the start-up sweep removes only leftovers no live process holds; the master copy's temp file goes on a full
disk; a cache or extension folder writable by other users is refused."""
import mmap
import multiprocessing
import os
import signal
import stat
import time

import pytest
import torch
from transformers import LlamaConfig

from seesaw_ds.distributed.host_kv import HostKVStore
from seesaw_ds.distributed.master_io import ShmSpaceError, write_safetensors_atomic
from seesaw_ds.distributed.private_dirs import UnsafeFolderError, check_trusted_folders
from seesaw_ds.distributed.shm_buffers import sweep_stale_shm
from seesaw_ds.models.config import ModelConfig
from tests.conftest import tiny_hf_model
from tests.distributed.harness import run_ranks


def _cfg() -> ModelConfig:      # 2 layers, 2 KV heads, head_dim 4: 128 bytes per fp32 token slot
    return ModelConfig.from_hf(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))


def test_host_store_is_private_and_refuses_an_existing_path_or_symlink(tmp_path):
    path = str(tmp_path / "kv")
    store = HostKVStore(_cfg(), 4, 8, torch.float32, path, create=True)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with pytest.raises(FileExistsError):
        HostKVStore(_cfg(), 4, 8, torch.float32, path, create=True)
    store.close()
    assert not os.path.exists(path)
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    for target in (victim, tmp_path / "absent"):            # a live or a dangling symlink at the name
        os.symlink(target, path)
        with pytest.raises(FileExistsError):
            HostKVStore(_cfg(), 4, 8, torch.float32, path, create=True)
        os.unlink(path)
    assert victim.read_bytes() == b"keep" and not (tmp_path / "absent").exists()
    with pytest.raises(RuntimeError, match="share one node's /dev/shm"):   # mapping a store that is not here
        HostKVStore(_cfg(), 4, 8, torch.float32, path, create=False)
    assert not os.path.exists(path)


def _blocks_larger_than_shm() -> int:
    st = os.statvfs("/dev/shm")
    return (st.f_blocks * st.f_frsize + (1 << 30)) // (8 * 128) + 1     # whole /dev/shm + 1 GiB: fails at once


def test_host_store_larger_than_shm_is_one_clear_error():
    path = HostKVStore.new_path()
    with pytest.raises(ShmSpaceError) as err:
        HostKVStore(_cfg(), _blocks_larger_than_shm(), 8, torch.float32, path, create=True, budget="kv.host_gb=99")
    message = str(err.value)
    assert "the host KV store (kv.host_gb=99)" in message and "bytes free" in message, message
    assert "Lower kv.host_gb" in message and "\n" not in message, message
    assert not os.path.exists(path)


def _start_with_too_large_host_store(rank, folder, host_gb):
    import torch.distributed as dist

    from seesaw_ds.distributed.builder import build_engine
    from seesaw_ds.engine.config import EngineConfig
    try:
        build_engine(EngineConfig(model=folder, dtype="float32", parallel="PP2->TP2", kv_host_gb=host_gb,
                                  block_size=8, max_model_len=64))
    except ShmSpaceError as err:            # every rank: the same error, and the group build_engine made is gone
        return {"error": str(err), "initialized": dist.is_initialized()}
    raise AssertionError("a host store larger than /dev/shm was created")


def test_startup_failure_after_the_process_group_leaves_nothing(tmp_path):
    model = tiny_hf_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
    model.save_pretrained(tmp_path / "model")
    st = os.statvfs("/dev/shm")
    host_gb = (st.f_blocks * st.f_frsize) / (1 << 30) + 1
    out = run_ranks(2, _start_with_too_large_host_store, str(tmp_path / "model"), host_gb, out_dir=str(tmp_path))
    assert f"kv.host_gb={host_gb:g}" in out["error"] and "bytes free" in out["error"], out
    assert out["initialized"] is False          # run_ranks also checks that no seesaw-kv-* file is left


def test_sweep_removes_only_files_no_live_process_holds(tmp_path):
    def make(name, age):
        path = tmp_path / name
        path.write_bytes(b"\0" * 4096)
        os.utime(path, (time.time() - age, time.time() - age))
        return str(path)
    stale_kv, stale_ds = make("seesaw-kv-node-dead", 60), make("deepspeed_allreduce_buffer_0_a_1_0", 60)
    held_open, held_mapped = make("seesaw-master-node-open", 60), make("deepspeed_allreduce_buffer_0_a_1_1", 60)
    young, foreign = make("seesaw-kv-node-young", 0), make("other-file", 60)
    fd = os.open(held_open, os.O_RDONLY)
    with open(held_mapped, "r+b") as f:
        mapping = mmap.mmap(f.fileno(), 4096)
    try:
        assert sweep_stale_shm(directory=str(tmp_path)) == sorted([stale_kv, stale_ds])
        assert all(os.path.exists(p) for p in (held_open, held_mapped, young, foreign))
    finally:
        os.close(fd)
        mapping.close()
    assert sweep_stale_shm(min_age_s=0, directory=str(tmp_path)) == sorted([held_mapped, held_open, young])


def _write_past_the_file_size_limit(folder, out, tensors):
    import resource
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)          # a full disk: the write fails (EFBIG)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
    try:                        # NOTE: no torch kernel in a forked child (its OpenMP pool may deadlock)
        write_safetensors_atomic(os.path.join(folder, "m.safetensors"), tensors)
        message = "no error"
    except OSError as err:
        message = type(err).__name__
    with open(out, "w") as f:
        f.write(message)


def test_master_temp_file_removed_on_a_full_disk_and_master_private(tmp_path):
    folder = tmp_path / "master"
    folder.mkdir()
    p = multiprocessing.get_context("fork").Process(target=_write_past_the_file_size_limit,
                                                    args=(str(folder), str(tmp_path / "out.txt"),
                                                          {"w": torch.zeros(1 << 16)}))
    p.start()
    p.join(60)
    assert (tmp_path / "out.txt").read_text() == "OSError" and os.listdir(folder) == []
    write_safetensors_atomic(str(folder / "m.safetensors"), {"w": torch.zeros(4)})
    assert stat.S_IMODE(os.stat(folder / "m.safetensors").st_mode) == 0o600


def test_cache_or_extension_folder_writable_by_others_is_refused(tmp_path, monkeypatch):
    cache, ext = tmp_path / "cache", tmp_path / "ext"
    cache.mkdir(mode=0o700)
    ext.mkdir(mode=0o700)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(ext))
    check_trusted_folders(str(cache))
    os.chmod(cache, 0o777)
    with pytest.raises(UnsafeFolderError, match=f"cache folder {cache} is writable by other users"):
        check_trusted_folders(str(cache))
    os.chmod(cache, 0o700)
    (ext / "py311_cpu").mkdir()
    os.chmod(ext / "py311_cpu", 0o775)
    with pytest.raises(UnsafeFolderError, match="TORCH_EXTENSIONS_DIR"):
        check_trusted_folders(str(cache))
