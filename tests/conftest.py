import os
import tempfile

# Tests run on CPU; 8 host devices let the sharding tests build real meshes.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# Compiled programs are cached on disk and shared by the `moe train` subprocesses, which
# compile the same steps again and again; the cache changes no number, only the time.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "moe-tests-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# A size limit turns on the cache's file lock (filelock): without one, jax writes an entry
# in place, and a process reading it while another writes it reads a truncated executable.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import gc  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from moe import progress  # noqa: E402

from helpers import Terminal, processes_with_env  # noqa: E402

# Every process a test starts, and every process those start, inherits this marker; at
# the end of the session none of them may still be alive (orphans included, which no
# longer show as children). Each pytest process (xdist workers too) owns its own marker.
OWNER = "MOE_TEST_OWNER"
os.environ[OWNER] = str(os.getpid())


@pytest.fixture(scope="session", autouse=True)
def no_process_outlives_the_suite():
    yield
    if not Path("/proc").is_dir():  # the check reads /proc (Linux, as CI)
        return
    from multiprocessing import resource_tracker

    # this process's own resource tracker exits with it (it reads until its pipe closes)
    own = {getattr(resource_tracker._resource_tracker, "_pid", None)}
    deadline = time.time() + 10
    while (
        left := [p for p in processes_with_env(OWNER, str(os.getpid())) if p[0] not in own]
    ) and time.time() < deadline:
        time.sleep(0.2)
    for pid, _ in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    assert not left, f"processes started by the tests outlived them (killed now): {left}"


MAX_MAP_COUNT = Path("/proc/sys/vm/max_map_count")


@pytest.fixture(scope="module", autouse=True)
def free_compiled_programs():
    """Every executable XLA compiles for CPU keeps about six memory mappings until jax drops
    it, and a test process compiles thousands: a whole suite in one xdist worker passes
    Linux's vm.max_map_count (65530), where the next mmap fails and the process dies in
    whatever maps memory next (a compile, the compilation cache). The programs a module
    shares stay compiled while it runs; jax's caches are emptied when it ends."""
    yield
    jax.clear_caches()
    gc.collect()
    maps = Path(f"/proc/{os.getpid()}/maps")
    if maps.is_file() and MAX_MAP_COUNT.is_file():  # Linux, as CI: what a module leaves behind
        count, limit = len(maps.read_text().splitlines()), int(MAX_MAP_COUNT.read_text())
        assert count < limit // 2, f"this test process holds {count} memory mappings of at most {limit}"


@pytest.fixture(scope="session")
def gcs():
    """A fake gs://moe-test bucket (tests/fake_gcs.py) for this test process and every process
    it starts: yields the Counter of uploads by object name."""
    import fake_gcs

    with fake_gcs.running() as (env, uploads):
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield uploads
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@pytest.fixture
def terminal(monkeypatch):
    """A terminal for progress bars to draw into (read it with getvalue()), progress wanted.
    (Patching sys.stderr itself would not hold: pytest's capture sets it again per phase.)"""
    stream = Terminal()
    monkeypatch.setattr(progress, "stream", lambda: stream)
    monkeypatch.setattr(progress, "_wanted", True)
    return stream
