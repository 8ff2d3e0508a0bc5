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
``JAX_COMPILATION_CACHE_DIR`` is used as it is and kept. For the same reason the tests that
compile one program carry one ``xdist_group`` mark, and a run spread over workers (``-n N``)
keeps each group on one worker.
"""
import os
import shutil
import tempfile

import pytest

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


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # pytest-xdist's default spreading ("load") ignores the groups; "loadgroup" spreads the
    # same way and keeps a group together. Set here rather than in addopts, so that a run
    # without xdist (``-p no:xdist``) still parses its options.
    if config.pluginmanager.hasplugin("xdist") and getattr(config.option, "dist", "no") == "load":
        config.option.dist = "loadgroup"


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
