"""The master copy: content-keyed cache files, writable copies (in memory and in private shared memory),
weight updates through them, and modules re-pointed at a copy with `bind_views`. Real checkpoints of tiny
random-weight models, real files, real ranks."""
import glob
import os
import signal
import stat

import pytest
import torch

from seesaw_ds.distributed import master_io
from seesaw_ds.distributed.master import MasterWeights, build_hf_model, checkpoint_key, prepare_master
from seesaw_ds.engine.comm import NullComm
from seesaw_ds.models.config import ModelConfig
from seesaw_ds.parallel.copy import bind_views
from seesaw_ds.parallel.weight_plan import whole_model_entries
from tests.conftest import tiny_hf_model
from tests.distributed.harness import run_ranks

IDS = torch.tensor([[3, 17, 250, 9, 41, 5]])


def _save(folder, seed, **overrides):
    model = tiny_hf_model("llama", seed=seed, **overrides)
    model.save_pretrained(folder)
    return model


def _logits(model):
    with torch.inference_mode():
        return model(IDS).logits


def test_rewritten_checkpoint_gets_a_new_master_and_stale_ones_go(tmp_path):
    folder, cache = str(tmp_path / "model"), str(tmp_path / "cache")
    _save(folder, seed=0)
    old_f32 = prepare_master(folder, "float32", cache)
    old_bf16 = prepare_master(folder, "bfloat16", cache)
    other = str(tmp_path / "other")
    _save(other, seed=2)
    other_master = prepare_master(other, "float32", cache)
    assert MasterWeights(old_f32).content_key == checkpoint_key(folder)
    mtime = os.stat(old_f32).st_mtime_ns
    assert prepare_master(folder, "float32", cache) == old_f32 and os.stat(old_f32).st_mtime_ns == mtime

    weights = os.path.join(folder, "model.safetensors")
    header = master_io.header_bytes(weights)
    new = _save(folder, seed=1)                    # overwritten in place: same names, shapes and size
    assert master_io.header_bytes(weights) == header
    new_path = prepare_master(folder, "float32", cache)
    assert new_path != old_f32
    assert not os.path.exists(old_f32) and not os.path.exists(old_bf16)
    assert os.path.exists(other_master)            # another folder's master is left alone
    master = MasterWeights(new_path)
    assert master.content_key == checkpoint_key(folder) != MasterWeights(other_master).content_key
    for name, t in new.state_dict().items():
        if name in master:
            assert torch.equal(master[name], t), name
    leftovers = [f for f in os.listdir(os.path.dirname(new_path)) if ".tmp-" in f]
    assert not leftovers


def test_failed_master_write_leaves_no_temp_file(tmp_path):
    target = tmp_path / "master.safetensors"
    target.mkdir()                                 # os.replace onto a non-empty directory fails
    (target / "keep").write_text("x")
    with pytest.raises(OSError):
        master_io.write_safetensors_atomic(str(target), {"a": torch.ones(3)})
    assert sorted(os.listdir(tmp_path)) == ["master.safetensors"]


@pytest.mark.parametrize("tied", [False, True])
def test_update_through_a_writable_copy_changes_what_the_model_computes(tmp_path, tied):
    folder = str(tmp_path / "model")
    old = _save(folder, seed=0, tie_word_embeddings=tied)
    new = tiny_hf_model("llama", seed=1, tie_word_embeddings=tied)
    master = MasterWeights(prepare_master(folder, "float32", str(tmp_path / "cache")))
    model = build_hf_model(folder, master, torch.float32)
    assert torch.allclose(_logits(model), _logits(old), atol=1e-5)
    with pytest.raises(RuntimeError, match="read-only.*writable_copy"):
        master.write(new.state_dict(), NullComm())

    copy = master.writable_copy(NullComm(), tag="test")
    assert copy.writable and copy.content_key == master.content_key
    cfg = ModelConfig.from_hf(old.config)
    assert bind_views(model, whole_model_entries(cfg), copy) == master.nbytes
    written = copy.write(new.state_dict(), NullComm())
    assert written == master.nbytes
    assert copy.content_key != master.content_key and "updated" in copy.content_key
    assert torch.allclose(_logits(model), _logits(new), atol=1e-5)
    assert torch.equal(master["model.norm.weight"], old.model.norm.weight)      # the cached file is intact

    key = copy.content_key                         # a trainer's named_parameters, in another dtype
    assert copy.write(((n, p.double()) for n, p in old.named_parameters()), NullComm()) == master.nbytes
    assert copy.content_key != key
    assert torch.allclose(_logits(model), _logits(old), atol=1e-5)


def test_write_rejects_unknown_names_and_bad_shapes_before_writing(tmp_path):
    model = tiny_hf_model("llama", seed=0, tie_word_embeddings=True)
    master = MasterWeights.from_tensors({n: t.clone() for n, t in model.state_dict().items()
                                         if n != "lm_head.weight"})
    assert master.writable and not master.shared
    key, norm = master.content_key, master["model.norm.weight"].clone()
    good = {"model.norm.weight": torch.zeros_like(norm)}
    with pytest.raises(ValueError, match="'model.layers.0.mlp.nope.weight'"):
        master.write({**good, "model.layers.0.mlp.nope.weight": torch.zeros(3)}, NullComm())
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(95,\).*\(96,\)"):
        master.write({"model.layers.0.input_layernorm.weight": torch.zeros(96),
                      "model.norm.weight": torch.zeros(95)}, NullComm())
    with pytest.raises(TypeError, match="not a tensor"):
        master.write({"model.norm.weight": [0.0] * 96}, NullComm())
    with pytest.raises(ValueError, match="rank 0 must pass"):
        master.write(None, NullComm())
    assert torch.equal(master["model.norm.weight"], norm) and master.content_key == key

    embed = master["model.embed_tokens.weight"]    # tied: the head is written to the embedding
    head = torch.randn_like(embed)
    assert master.write({"lm_head.weight": head}, NullComm()) == embed.numel() * 4
    assert torch.equal(master["model.embed_tokens.weight"], head) and master.content_key != key
    with pytest.raises(ValueError, match="ties them"):
        master.write({"model.embed_tokens.weight": head, "lm_head.weight": head + 1}, NullComm())
    state = model.state_dict()                     # a tied model's state dict holds both names
    assert master.write(state, NullComm()) == master.nbytes

    key = master.content_key                       # a stream: pairs before the bad one are written
    with pytest.raises(ValueError, match="'bogus'"):
        master.write(iter([("model.norm.weight", torch.ones(96)), ("bogus", torch.ones(1))]), NullComm())
    assert torch.equal(master["model.norm.weight"], torch.ones(96)) and master.content_key != key


def test_shm_file_is_private_and_exclusive(tmp_path):
    path = master_io.shm_path("test")
    assert os.path.dirname(path) == "/dev/shm" and os.path.basename(path).startswith("seesaw-master-test-")
    fd = master_io.create_shm_file(path, 4096)
    try:
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600 and os.fstat(fd).st_size == 4096
        with pytest.raises(FileExistsError):
            master_io.create_shm_file(path, 4096)
    finally:
        os.close(fd)
        os.unlink(path)
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    for target in (str(victim), str(tmp_path / "absent")):   # a symlink planted at the name, live or dangling
        link = master_io.shm_path("test")
        os.symlink(target, link)
        try:
            with pytest.raises(FileExistsError):
                master_io.create_shm_file(link, 4096)
        finally:
            os.unlink(link)
    assert victim.read_bytes() == b"keep" and not (tmp_path / "absent").exists()


def test_shm_file_that_cannot_be_reserved_is_removed(tmp_path):
    import multiprocessing
    import resource

    def child(out):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)          # exceeding the limit: EFBIG, not a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
        path = master_io.shm_path("test-full")
        try:
            master_io.create_shm_file(path, 1 << 20)
            message = "no error"
        except OSError as err:
            message = str(err)
        with open(out, "w") as f:
            f.write(f"{message}\n{os.path.exists(path)}")

    out = str(tmp_path / "out.txt")
    p = multiprocessing.get_context("fork").Process(target=child, args=(out,))
    p.start()
    p.join(60)
    message, exists = open(out).read().rsplit("\n", 1)
    assert "cannot reserve 1048576 bytes" in message and "bytes free" in message, message
    assert exists == "False"


def _two_ranks(rank, master_file, new_state, new_logits, folder, tag):
    import torch.distributed as dist

    from seesaw_ds.engine.comm import TorchComm
    dist.init_process_group("gloo")
    comm = TorchComm()
    master = MasterWeights(master_file)
    model = build_hf_model(folder, master, torch.float32)
    copy = master.writable_copy(comm, tag)
    assert copy.shared and copy.writable
    assert not glob.glob(f"/dev/shm/seesaw-master-{tag}-*"), "the shm name must be gone once all have mapped it"
    with open("/proc/self/maps") as f:
        maps = {line.split(None, 5)[-1].strip() for line in f if f"seesaw-master-{tag}-" in line}
    assert len(maps) == 1 and next(iter(maps)).endswith("(deleted)"), maps
    bind_views(model, whole_model_entries(ModelConfig.from_hf(model.config)), copy)

    written = copy.write(new_state if rank == 0 else None, comm)          # rank 0 writes, rank 1 sees it
    assert written == master.nbytes
    for name, t in new_state.items():
        assert torch.equal(copy[name], t), (rank, name)
    assert torch.allclose(_logits(model), new_logits, atol=1e-5)
    keys = [comm.broadcast_object(copy.content_key if r == rank else None, src=r) for r in range(2)]
    assert keys[0] == keys[1] != master.content_key

    with pytest.raises((ValueError, RuntimeError), match="bogus"):
        copy.write({"bogus": torch.ones(1)} if rank == 0 else None, comm)
    assert copy.content_key == keys[0]

    private = MasterWeights.from_tensors({"w": torch.full((4,), float(rank))})  # each rank its own memory
    private.write({"w": torch.full((4,), 7.0)} if rank == 0 else None, comm)
    assert torch.equal(private["w"], torch.full((4,), 7.0))
    return {"maps": sorted(maps), "key": keys[0]}


def test_two_ranks_share_one_writable_copy(tmp_path):
    folder = str(tmp_path / "model")
    _save(folder, seed=0)
    new = tiny_hf_model("llama", seed=1)
    master_file = prepare_master(folder, "float32", str(tmp_path / "cache"))
    tag = f"t{os.getpid()}"
    out = run_ranks(2, _two_ranks, master_file, {n: t.detach().clone() for n, t in new.state_dict().items()},
                    _logits(new), folder, tag, out_dir=str(tmp_path))
    assert "updated" in out["key"]
    assert not glob.glob(f"/dev/shm/seesaw-master-{tag}-*")
