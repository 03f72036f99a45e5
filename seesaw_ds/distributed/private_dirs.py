"""Folders whose files a job trusts: the cache ($SEESAW_CACHE: converted models, master copies) and torch's
JIT extension folder ($TORCH_EXTENSIONS_DIR: compiled .so files that every rank loads). Another local user
who can write there could plant weights or code, so a folder writable by group or others, or owned by
another user, is refused with one error naming it. Standard library only.
"""
from __future__ import annotations

import os
import stat


class UnsafeFolderError(PermissionError):
    """A folder the job would trust is writable by other users."""


def check_private_folder(path: str, what: str, setting: str) -> None:
    """Refuse `path` (if it exists) when a user other than this one (or root) could write into it.
    `what` says what the folder holds; `setting` is how to point the job elsewhere."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return                      # created private (0700) when first needed
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeFolderError(f"{what} {path} is not a folder; set {setting} to a private folder")
    uid = os.getuid()
    if st.st_uid not in (uid, 0) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        owner = "another user" if st.st_uid not in (uid, 0) else f"mode {stat.S_IMODE(st.st_mode):o}"
        raise UnsafeFolderError(f"{what} {path} is writable by other users ({owner}): its files would be "
                                f"trusted as is; run `chmod go-w {path}` or set {setting} to a private folder")


def torch_extensions_root() -> str:
    """Where torch's extension builder puts compiled ops (its own default when the variable is unset)."""
    return os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "torch_extensions")


def check_trusted_folders(cache_dir: str | None = None) -> None:
    """The cache folder (when given) and the extension folder, each refused if others can write into it."""
    if cache_dir:
        check_private_folder(cache_dir, "the cache folder", "SEESAW_CACHE (or cache_dir)")
    root = torch_extensions_root()
    check_private_folder(root, "the compiled-extension folder", "TORCH_EXTENSIONS_DIR")
    try:
        versions = [os.path.join(root, n) for n in os.listdir(root)]
    except OSError:
        versions = []
    for folder in versions:        # e.g. py311_cpu: the folder the .so files are loaded from
        if os.path.isdir(folder):
            check_private_folder(folder, "the compiled-extension folder", "TORCH_EXTENSIONS_DIR")
