"""One job per output folder: the lock file's owner record, a stale lock (dead pid) taken over with a notice,
a live or foreign-host lock refused, and `overwrite` refused on a folder another live job holds."""
import json
import os
import socket
import subprocess
import sys

import pytest

from seesaw_ds.jobs.output_lock import LOCK_NAME, hold_output_lock, other_live_owner
from seesaw_ds.jobs.outputs import OutputError, existing_shards
from tests.jobs.conftest import write_jsonl
from tests.jobs.kill9_job import main as run_fake_job


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(directory, host, pid):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, LOCK_NAME), "w") as handle:
        json.dump({"host": host, "pid": pid, "started": "2026-01-01T00:00:00+00:00"}, handle)


def test_the_lock_names_its_owner_counts_holds_and_goes_with_the_last(tmp_path):
    lock = hold_output_lock(str(tmp_path / "out"), announce=pytest.fail)
    owner = json.load(open(tmp_path / "out" / LOCK_NAME))
    assert owner["host"] == socket.gethostname() and owner["pid"] == os.getpid()
    again = hold_output_lock(str(tmp_path / "out"))
    assert again is lock and lock.count == 2
    again.release()
    assert os.path.exists(tmp_path / "out" / LOCK_NAME)
    lock.release()
    assert not os.path.exists(tmp_path / "out" / LOCK_NAME)


def test_a_live_job_or_another_host_is_refused(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path / "out", socket.gethostname(), sleeper.pid)
        with pytest.raises(OutputError, match=rf"is in use by another job \(pid {sleeper.pid} on host .*is running"):
            hold_output_lock(str(tmp_path / "out"))
        assert other_live_owner(str(tmp_path / "out")).startswith(f"pid {sleeper.pid}")
    finally:
        sleeper.kill()
        sleeper.wait()
    write_lock(tmp_path / "other", "some-other-host", 1)
    with pytest.raises(OutputError, match=r"may be running \(another host: not checked\).*delete .*\.seesaw-job\.lock"):
        hold_output_lock(str(tmp_path / "other"))


def test_a_stale_lock_is_taken_over_with_a_notice_and_the_job_completes(tmp_path, capsys):
    rows = [{"key": f"k{i:02d}", "text": f"row {i}", "n": 2, "blob": None} for i in range(25)]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    pid = dead_pid()
    write_lock(out, socket.gethostname(), pid)   # a job killed with -9 leaves its lock behind
    run_fake_job(path, str(out), "0")
    said = capsys.readouterr().out
    assert f"took over the stale lock of output.dir {out} (its job, pid {pid} on host" in said
    assert not os.path.exists(out / LOCK_NAME) and len(existing_shards(str(out))) == 3


def test_overwrite_never_touches_a_folder_a_live_job_holds(tmp_path):
    from seesaw_ds.jobs.outputs import job_fingerprint, prepare_output_dir
    from seesaw_ds.jobs.recipe import parse_recipe
    recipe = parse_recipe({"data": {"source": "in.jsonl", "columns": {"prompt": "t"}},
                           "output": {"dir": str(tmp_path / "out"), "overwrite": True}})
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path / "out", socket.gethostname(), sleeper.pid)
        (tmp_path / "out" / "part-r000-00000.parquet").write_bytes(b"a live job's shard")
        with pytest.raises(OutputError, match="output.overwrite does not touch it"):
            prepare_output_dir(recipe.output, job_fingerprint(recipe, "in.jsonl"), recipe)
        assert (tmp_path / "out" / "part-r000-00000.parquet").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
