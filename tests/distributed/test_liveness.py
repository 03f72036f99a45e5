"""A dead rank ends the job: real TP2 decode ranks (DeepSpeed's shared-memory all-reduce, which spins with no
timeout), one of them killed mid-decode, with and without the deepspeed launcher. The survivor ends within
60 s with one `error: [rank R] ...` line; its /dev/shm files go with it, and the killed rank's (which ran no
cleanup) go at the next start-up's sweep. Rank-0-only work longer than the collective timeout is
heart-beaten, and its error reaches every rank."""
import glob
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import tiny_hf_model
from tests.distributed.harness import free_port, run_ranks

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DRIVER = os.path.join(REPO, "tests", "distributed", "decode_rank.py")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("liveness") / "model"
    tiny_hf_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2).save_pretrained(folder)
    return str(folder)


def _buffers(port):
    return glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")


def _wait_for(paths, procs, seconds):
    deadline = time.monotonic() + seconds
    while not all(os.path.exists(p) for p in paths):
        assert time.monotonic() < deadline, "the ranks never started decoding"
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.2)


def _env(port, rank, **extra):
    return dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                WORLD_SIZE="2", LOCAL_SIZE="2", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", **extra)


def test_rank_exiting_mid_decode_ends_the_other_without_launcher(model_folder, tmp_path):
    port = free_port()
    procs = [subprocess.Popen([sys.executable, DRIVER, model_folder, str(tmp_path)] +
                              (["--exit-after", "12"] if rank == 1 else []), cwd=REPO, env=_env(port, rank),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    try:
        _wait_for([tmp_path / "rank0.pid", tmp_path / "rank1.pid"], [procs[0]], 600)
        assert procs[1].wait(timeout=60) == 7          # os._exit mid-decode: no cleanup, no message
        gone = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        waited = time.monotonic() - gone
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode == 1 and waited < 60, (procs[0].returncode, waited)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: [rank 0] rank 1 (pid "), err[-2000:]
    assert not _buffers(port)        # its own, and on its way out the killed rank's


def test_sigkill_under_launcher_leaves_no_shared_memory(model_folder, tmp_path):
    port, logs = free_port(), tmp_path / "logs"
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [launcher if os.path.exists(launcher) else "deepspeed", "--num_gpus", "2", "--master_port", str(port),
           "--enable_each_rank_log", str(logs), DRIVER, model_folder, str(tmp_path)]
    kv_before = set(glob.glob("/dev/shm/seesaw-kv-*"))
    job = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for([tmp_path / "rank0.pid", tmp_path / "rank1.pid"], [job], 600)
        os.kill(int((tmp_path / "rank1.pid").read_text()), signal.SIGKILL)
        job.communicate(timeout=90)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode != 0
    [rank0_log] = glob.glob(str(logs / "*_rank0.log"))
    rank0_errors = [line for line in open(rank0_log).read().splitlines() if line.startswith("error: [rank 0] ")]
    assert rank0_errors, "rank 0 printed no error line"   # the launcher's SIGTERM, or gloo seeing the peer go first
    # rank 0 removed its own buffer and, on its way out, the killed rank's
    assert not _buffers(port) and not set(glob.glob("/dev/shm/seesaw-kv-*")) - kv_before


def _slow_rank0(rank, seconds, fail):
    import time as clock

    from seesaw_ds.distributed.builder import init_distributed
    from seesaw_ds.engine.comm import TorchComm
    init_distributed()
    comm = TorchComm()

    def work():
        clock.sleep(seconds if rank == 0 else 0)     # the others reuse what rank 0 made
        if fail:
            raise FileNotFoundError("no such model: /nowhere")
        return "converted"
    try:
        return {"result": comm.on_rank0_then_all(work)}
    except FileNotFoundError as err:    # the same exception on every rank
        return {"error": str(err)}


@pytest.mark.parametrize("seconds, fail", [(14, False), (0, True)])   # 14 s: longer than the timeout
def test_rank0_work_longer_than_the_timeout_is_heart_beaten(seconds, fail, tmp_path, monkeypatch):
    monkeypatch.setenv("SEESAW_COLLECTIVE_TIMEOUT_S", "10")   # NOTE: rendezvous too: slack for a busy machine
    out = run_ranks(2, _slow_rank0, seconds, fail, out_dir=str(tmp_path))
    assert out == ({"error": "no such model: /nowhere"} if fail else {"result": "converted"})
