"""The per-thread index-check setting: pyvlm.ops.index_checks and
index_checks_enabled (csrc/checks.cpp). CPU ops check whatever the setting;
the CUDA side is exercised in test_attention, test_layers and test_prefill."""

import os
import subprocess
import sys
import threading

import pytest
import torch

import pyvlm
from pyvlm import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(pyvlm.__file__)))


@pytest.fixture(autouse=True)
def checks_start_on():
    # Each test starts from the default (on): a test that leaked its setting
    # into this thread would fail the next one here, not somewhere far away.
    assert ops.index_checks_enabled(), "index checks were left off on the test thread"


def bad_slot_write():
    """reshape_and_cache with a slot past the cache's 8 slots."""
    cache = torch.zeros(2, 4, 1, 8)
    ops.reshape_and_cache(torch.randn(1, 1, 8), torch.randn(1, 1, 8), cache, cache.clone(),
                          torch.tensor([8]))


def test_scope_sets_the_setting_and_restores_it():
    with ops.index_checks(False):
        assert not ops.index_checks_enabled()
        with ops.index_checks(True):
            assert ops.index_checks_enabled()
        assert not ops.index_checks_enabled()
    assert ops.index_checks_enabled()


def test_scope_restores_the_setting_after_an_exception():
    with pytest.raises(KeyError):
        with ops.index_checks(False):
            raise KeyError("raised inside the scope")
    assert ops.index_checks_enabled()


def test_cpu_ops_check_indices_even_when_the_setting_is_off():
    with ops.index_checks(False):
        with pytest.raises(IndexError, match="slot_mapping values must be <"):
            bad_slot_write()


def run_in_thread(fn):
    """fn() on a new thread; returns its result, re-raises its exception."""
    result = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as exc:  # handed back to the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the thread did not finish"
    if "error" in result:
        raise result["error"]
    return result["value"]


def test_a_thread_that_turns_checks_off_leaves_other_threads_alone():
    inside, release = threading.Event(), threading.Event()
    seen = {}

    def engine_like_thread():
        with ops.index_checks(False):
            seen["inside"] = ops.index_checks_enabled()
            inside.set()
            release.wait(60)
        seen["after"] = ops.index_checks_enabled()

    thread = threading.Thread(target=engine_like_thread)
    thread.start()
    try:
        assert inside.wait(60)
        # While that thread is inside its scope: this thread and a new one keep theirs.
        assert ops.index_checks_enabled()
        assert run_in_thread(ops.index_checks_enabled)
    finally:
        release.set()
        thread.join(60)
    assert seen == {"inside": False, "after": True}


def test_a_new_thread_starts_from_the_default_not_from_its_creator():
    with ops.index_checks(False):
        assert run_in_thread(ops.index_checks_enabled)
        with pytest.raises(IndexError):
            run_in_thread(bad_slot_write)


def child_settings(env_value):
    """index_checks_enabled() on the main thread and on a new thread of a
    fresh process started with PYVLM_CHECK_INDICES=env_value (None: unset)."""
    code = (
        "import threading\n"
        "from pyvlm import ops\n"
        "seen = [ops.index_checks_enabled()]\n"
        "thread = threading.Thread(target=lambda: seen.append(ops.index_checks_enabled()))\n"
        "thread.start(); thread.join()\n"
        "with ops.index_checks(not seen[0]):\n"
        "    seen.append(ops.index_checks_enabled())\n"
        "seen.append(ops.index_checks_enabled())\n"
        "print(seen)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYVLM_CHECK_INDICES"}
    if env_value is not None:
        env["PYVLM_CHECK_INDICES"] = env_value
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


@pytest.mark.parametrize("env_value, default", [(None, True), ("1", True), ("0", False)])
def test_environment_variable_is_every_threads_default(env_value, default):
    # main thread, new thread, inside a scope that flips it, after the scope
    assert child_settings(env_value) == str([default, default, not default, default])


def test_torch_compile_applies_the_setting_at_run_time():
    def step(x):
        with ops.index_checks(False):
            inside = ops.index_checks_enabled()
        return x + 1, inside, ops.index_checks_enabled()

    compiled = torch.compile(step, backend="aot_eager")
    x = torch.randn(4)
    out, inside, after = compiled(x)
    assert torch.equal(out, x + 1)
    assert (inside, after) == (False, True)
    with ops.index_checks(False):  # a second call with another setting around it
        assert compiled(x)[1:] == (False, False)
