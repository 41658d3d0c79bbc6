"""built_once: a folder in pyvlm's cache built by its first caller, reused
after, and never left half-built."""

import random

import pytest

from pyvlm.conversions import cache


def writes_config(directory):
    (directory / "config.json").write_text("{}")
    (directory / "weights.bin").write_bytes(random.randbytes(64))


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PYVLM_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_built_once_then_reused(cache_dir):
    name = f"model-{random.randrange(10**6)}"
    folder = cache.built_once(name, writes_config)
    weights = (folder / "weights.bin").read_bytes()

    def must_not_rebuild(directory):
        raise AssertionError("rebuilt a cached folder")

    assert cache.built_once(name, must_not_rebuild) == folder == cache_dir / name
    assert (folder / "weights.bin").read_bytes() == weights
    assert [p.name for p in cache_dir.iterdir()] == [name]  # no half-built leftovers


def test_a_failed_build_leaves_nothing_behind(cache_dir):
    def fails_midway(directory):
        (directory / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        cache.built_once("model", fails_midway)
    assert list(cache_dir.iterdir()) == []


def test_a_folder_another_process_published_first_is_kept(cache_dir):
    def publishes_first_elsewhere(directory):
        writes_config(directory)
        writes_config(cache_dir / "model")

    (cache_dir / "model").mkdir()
    folder = cache.built_once("model", publishes_first_elsewhere)
    assert (folder / "config.json").is_file()
    assert [p.name for p in cache_dir.iterdir()] == ["model"]


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("PYVLM_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_root() == tmp_path / "explicit"
    monkeypatch.delenv("PYVLM_CACHE_DIR")
    assert cache.cache_root() == tmp_path / "xdg" / "pyvlm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_root() == tmp_path / "home" / ".cache" / "pyvlm"
