"""A baseline revision of seesaw_ds beside the working tree, for before/after benchmark rows.

    with baseline_worktree("HEAD~3") as tree:      # git worktree add --detach, removed again on exit
        command = [sys.executable, str(tree.runner), ...]

The worktree is a clean checkout of the revision. The benchmark's harness files (`HARNESS`: the seesaw runner
and the runner helpers) are copied in from the working tree, so baseline and current rows time the same way
and record the same fields (the output-token digests the identity check needs); only `seesaw_ds` differs.
The runner puts its own repo root first on sys.path, so it imports the worktree's `seesaw_ds`, not the
installed one. `cache_dir` is a private `SEESAW_CACHE` for the baseline rows: master copies and other derived
files written by one revision are never read by another.
"""
from __future__ import annotations

import contextlib
import dataclasses
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
HARNESS = ("evals/peers/seesaw_runner.py", "evals/peers/common.py", "evals/peers/__init__.py")


@dataclasses.dataclass(frozen=True)
class BaselineTree:
    rev: str           # as given, e.g. HEAD~1 or a tag
    commit: str        # full hash
    short: str         # short hash: the suffix of the baseline rows' labels (TP2@<short>)
    root: Path         # the worktree
    cache_dir: Path    # SEESAW_CACHE of the baseline rows

    @property
    def runner(self) -> Path:
        return self.root / "evals" / "peers" / "seesaw_runner.py"

    def label(self, layout: str) -> str:
        return f"{layout}@{self.short}"


def _git(repo: Path, *args: str) -> str:
    proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip()


def resolve_commit(rev: str, repo: Path = REPO) -> tuple[str, str]:
    """(full hash, short hash) of `rev`; ValueError when it names no commit."""
    try:
        commit = _git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except RuntimeError:
        commit = ""
    if not commit:
        raise ValueError(f"--baseline {rev!r} is not a commit of {repo}")
    return commit, _git(repo, "rev-parse", "--short", commit)


@contextlib.contextmanager
def baseline_worktree(rev: str, repo: Path = REPO, harness_from: Path = REPO,
                      harness: tuple[str, ...] = HARNESS) -> Iterator[BaselineTree]:
    """A detached worktree of `rev` in a temporary folder with the current harness copied in; removed (and
    pruned from git's worktree list) on exit, also when the benchmark fails or is interrupted."""
    commit, short = resolve_commit(rev, repo)
    tmp = Path(tempfile.mkdtemp(prefix=f"seesaw-baseline-{short}-"))
    root = tmp / "tree"
    try:
        _git(repo, "worktree", "add", "--detach", str(root), commit)
        for name in harness:
            source = harness_from / name
            if source.is_file():
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, root / name)
        cache = tmp / "cache"
        cache.mkdir()
        yield BaselineTree(rev, commit, short, root, cache)
    finally:
        try:
            _git(repo, "worktree", "remove", "--force", str(root))
        except RuntimeError:       # never added, or its folder is gone: drop git's record of it
            if root.exists():
                shutil.rmtree(root, ignore_errors=True)
            with contextlib.suppress(RuntimeError):
                _git(repo, "worktree", "prune")
        shutil.rmtree(tmp, ignore_errors=True)
