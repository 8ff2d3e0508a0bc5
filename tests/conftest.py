"""Test-wide setup: four fake CPU devices for the data-parallel tests, and one persistent
compilation cache per test run.

XLA reads the device flag once, when the backend starts, so it is set here before any
test module imports jax.

Compilation dominates the slow tests (a stage-1 step takes about a minute to compile on one
core and a fifth of a second to run). Several tests compile the same program: a run and its
resumption, one step under two tests that share a config. A cache folder made here, before
pytest-xdist starts its workers (they inherit the environment), lets every process of this
run reuse what another compiled; it is removed when the run ends. It starts empty, so a test
run times the same on a fresh machine and here. A cache the caller names in
``JAX_COMPILATION_CACHE_DIR`` is used as it is and kept.
"""
import os
import shutil
import tempfile

_flag = "--xla_force_host_platform_device_count=4"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_OWN_CACHE = None
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _OWN_CACHE = tempfile.mkdtemp(prefix="cpsl_jax_test_compilation_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    # Only programs that took a second to compile: the many small ones cost more to store.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
