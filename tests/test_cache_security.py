"""The C kernel's cache runs nothing that someone else could have planted (as an attacker sharing
the machine would try: a world-writable cache directory, a library under the exact name the
project computes with a matching .sha256, a symlink, a file of another user's).

Each case runs a fresh process (the library is loaded once per process) with its own cache
directory; the planted library's constructor writes a marker file, so loading it shows.
"""

import hashlib
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import CPU_KERNEL
from snr_triton import SNRAdamW
from snr_triton.backend import cpu, kernel_cache
from test_cpu import LOAD, counting_cc

pytestmark = pytest.mark.skipif(not CPU_KERNEL or not hasattr(os, "getuid"),
                                reason="needs a C compiler and POSIX users")

PLANTED = textwrap.dedent("""
    #include <stdio.h>
    #include <stdlib.h>
    __attribute__((constructor)) static void planted(void) {
        FILE *f = fopen(getenv("MARKER"), "w");
        if (f) { fputs("planted code ran", f); fclose(f); }
    }
""")


def plant(path, tmp_path):
    """A library at `path` whose constructor writes $MARKER, and a .sha256 beside it that matches."""
    source = tmp_path / "planted.c"
    source.write_text(PLANTED)
    subprocess.run([cpu._compiler(), "-shared", "-fPIC", str(source), "-o", str(path)], check=True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    (path.parent / f"{path.name}.sha256").write_text(digest)


def step_in_fresh_process(cache, tmp_path, cc=None, prelude=""):
    marker = tmp_path / "marker"
    env = dict(os.environ, SNR_TRITON_CACHE=str(cache), MARKER=str(marker), PYTHONWARNINGS="always")
    if cc:
        env["CC"] = cc
    proc = subprocess.run([sys.executable, "-c", prelude + LOAD], env=env, capture_output=True, text=True,
                          timeout=240)
    return proc, marker.exists()


def test_a_library_planted_in_a_world_writable_cache_is_never_loaded(tmp_path):
    cache = tmp_path / "shared"
    cache.mkdir()
    cache.chmod(0o777)  # what a shared folder under /tmp is
    plant(cache / cpu.library_name(), tmp_path)
    proc, ran = step_in_fresh_process(cache, tmp_path)
    assert proc.returncode == 0 and "stepped" in proc.stdout, proc.stderr
    assert not ran
    assert f"the kernel cache {cache} is not used: it is writable by group and others" in proc.stderr


def test_a_planted_symlink_is_never_followed(tmp_path):
    cache = tmp_path / "mine"
    cache.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    plant(elsewhere / "evil.so", tmp_path)
    name = cpu.library_name()
    (cache / name).symlink_to(elsewhere / "evil.so")
    (cache / f"{name}.sha256").write_text((elsewhere / "evil.so.sha256").read_text())
    proc, ran = step_in_fresh_process(cache, tmp_path)
    assert proc.returncode == 0 and "stepped" in proc.stdout, proc.stderr
    assert not ran
    assert "the cached kernel is not loaded" in proc.stderr and "compiling privately" in proc.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_library_of_another_user_is_never_loaded(tmp_path):
    cache = tmp_path / "mine"
    cache.mkdir(mode=0o700)
    plant(cache / cpu.library_name(), tmp_path)
    os.chown(cache / cpu.library_name(), 65534, 65534)  # nobody's
    proc, ran = step_in_fresh_process(cache, tmp_path)
    assert proc.returncode == 0 and "stepped" in proc.stdout, proc.stderr
    assert not ran and "belongs to uid 65534" in proc.stderr


def test_a_group_writable_cache_falls_back_with_a_warning(tmp_path):
    cc, log = counting_cc(tmp_path)
    cache = tmp_path / "group"
    cache.mkdir()
    cache.chmod(0o770)
    proc, _ = step_in_fresh_process(cache, tmp_path, cc)
    assert proc.returncode == 0 and "stepped" in proc.stdout, proc.stderr
    assert "is writable by its group (mode 770)" in proc.stderr
    # attributed to the user's script (`python -c`), the line that made the optimizer
    assert re.search(r"^<string>:\d+: UserWarning: SNRAdamW: the kernel cache", proc.stderr, re.M), proc.stderr
    assert not list(cache.glob("*.so"))  # compiled privately, nothing written there


def test_a_private_cache_of_ones_own_keeps_working(tmp_path):
    cc, log = counting_cc(tmp_path)
    cache = tmp_path / "fresh" / "cache"  # made by the cache itself: 0700
    for _ in range(2):
        proc, _ = step_in_fresh_process(cache, tmp_path, cc)
        assert proc.returncode == 0 and "stepped" in proc.stdout, proc.stderr
        assert "SNRAdamW:" not in proc.stderr  # no warning
    assert log.read_text().count("run") == 1  # compiled once, then loaded from the cache
    assert (cache.stat().st_mode & 0o777) == 0o700
    (lib,) = cache.glob("*.so")
    assert not lib.stat().st_mode & 0o022 and not (cache / f"{lib.name}.lock").stat().st_mode & 0o077


def test_without_fcntl_the_kernel_still_loads(tmp_path):
    """Windows has no fcntl: the module imports, and the cache works without the lock."""
    proc, _ = step_in_fresh_process(tmp_path / "cache", tmp_path, prelude="import sys; sys.modules['fcntl'] = None\n")
    assert proc.returncode == 0 and "stepped" in proc.stdout, proc.stderr


def test_no_check_runs_on_the_steps_path(monkeypatch):
    """The checks run once per process, when the library is first loaded."""
    cpu.load_library()

    def refuse(*args, **kwargs):
        raise AssertionError("a cache check ran during a step")

    monkeypatch.setattr(kernel_cache, "open_trusted", refuse)
    monkeypatch.setattr(kernel_cache, "load", refuse)
    p = torch.nn.Parameter(torch.ones(8))
    opt = SNRAdamW([p], backend="cpu")
    for _ in range(3):
        p.grad = torch.ones(8)
        opt.step()
    assert torch.isfinite(p).all()
