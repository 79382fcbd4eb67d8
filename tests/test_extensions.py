"""A C++ kernel build killed half-way leaves torch's lock file behind: the next run must not wait forever."""

import os
import time

import pytest
from torch.utils import cpp_extension

from qwenkit import extensions


@pytest.fixture
def build_root(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    return tmp_path


def make_lock(root, name, age_seconds):
    lock = root / name / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    then = time.time() - age_seconds
    os.utime(lock, (then, then))
    return lock


def test_only_an_old_lock_is_stale(build_root):
    assert extensions.stale_lock("k") is None  # no build directory yet
    lock = make_lock(build_root, "k", 30)
    assert extensions.stale_lock("k") is None  # a build may be running in another process
    make_lock(build_root, "k", extensions.STALE_LOCK_SECONDS + 60)
    assert extensions.stale_lock("k") == lock


def test_build_removes_a_stale_lock_before_compiling(build_root, monkeypatch):
    lock = make_lock(build_root, "k", extensions.STALE_LOCK_SECONDS + 60)
    seen = {}

    def load(name, **options):  # torch would wait for the lock to go away here
        seen.update(name=name, locked=lock.exists(), **options)
        return "module"

    monkeypatch.setattr(cpp_extension, "load", load)
    with pytest.warns(UserWarning, match="interrupted"):
        assert extensions.build_extension("k", sources=["a.cpp"]) == "module"
    assert seen == {"name": "k", "locked": False, "sources": ["a.cpp"], "verbose": False}
    fresh = make_lock(build_root, "k", 5)
    extensions.build_extension("k", sources=["a.cpp"])
    assert seen["locked"] and fresh.exists()
