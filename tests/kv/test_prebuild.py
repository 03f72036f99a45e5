"""The install-time build of the compiled CPU ops: idempotent, and it leaves them loadable without a compile."""
import subprocess
import sys
import time

import pytest

from seesaw_ds import prebuild


@pytest.fixture(scope="module")
def prebuilt():
    if prebuild.missing():
        pytest.skip(f"not prebuilt here ({', '.join(prebuild.missing())}): run `make prebuild`")


def test_prebuild_is_idempotent_and_loads_without_compiling(prebuilt):
    out = subprocess.run([sys.executable, "-m", "seesaw_ds.prebuild"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "already built" in out.stdout
    assert prebuild.missing() == []
    t0 = time.perf_counter()
    seconds = prebuild.build(["seesaw_ds attention kernels", "DeepSpeed shm all-reduce"], log=lambda _: None)
    assert time.perf_counter() - t0 < 15, seconds        # a load, not a compile (a compile takes minutes)


def test_a_job_announces_a_build_on_one_line_and_only_when_one_is_needed(prebuilt, tmp_path, monkeypatch):
    said = []
    assert prebuild.ensure_built(said.append) == 0.0 and said == []
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))      # a fresh machine's empty cache
    assert set(prebuild.missing()) == {"seesaw_ds attention kernels", "DeepSpeed shm all-reduce"}
    monkeypatch.setattr(prebuild, "build", lambda ops, log=print: {op: 0.0 for op in ops})
    prebuild.ensure_built(said.append)
    assert len(said) == 1 and said[0].startswith("building CPU kernels (once, ~120 s)")
