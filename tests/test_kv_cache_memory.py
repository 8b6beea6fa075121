"""The KV cache budget per rank: a size, or "auto" (a share of the device's memory)."""

from __future__ import annotations

import argparse
import os

import pytest

from disagg import cpus
from disagg.config import AUTO_KV_CPU_CAP, EngineConfig, resolve_kv_cache_memory
from disagg.engine_args import add_engine_args, engine_config_from_args

GiB = 1 << 30


@pytest.fixture
def no_env(monkeypatch):
    """The tests' conftest pins the budget through the environment; these test "auto"."""
    monkeypatch.delenv("DISAGG_KV_CACHE_MEMORY", raising=False)


def test_auto_takes_an_eighth_of_the_host_up_to_the_cap(no_env, monkeypatch):
    monkeypatch.setattr(cpus, "host_memory_limit", lambda: 8 * GiB)
    assert resolve_kv_cache_memory("auto", "cpu") == GiB
    assert EngineConfig().kv_cache_memory == GiB
    monkeypatch.setattr(cpus, "host_memory_limit", lambda: 256 * GiB)
    assert EngineConfig(kv_cache_memory="auto").kv_cache_memory == AUTO_KV_CPU_CAP == 4 * GiB
    assert EngineConfig(kv_cache_memory="512MiB").kv_cache_memory == 512 << 20   # explicit wins


def test_the_environment_sets_what_auto_means(monkeypatch):
    monkeypatch.setenv("DISAGG_KV_CACHE_MEMORY", "2GiB")
    assert EngineConfig().kv_cache_memory == 2 * GiB
    assert EngineConfig(kv_cache_memory=3 << 20).kv_cache_memory == 3 << 20        # explicit wins
    monkeypatch.setenv("DISAGG_KV_CACHE_MEMORY", "lots")
    with pytest.raises(ValueError, match="DISAGG_KV_CACHE_MEMORY"):
        EngineConfig()
    with pytest.raises(ValueError, match="cannot parse size"):
        EngineConfig(kv_cache_memory="autox")


def test_host_memory_limit_is_the_smaller_of_ram_and_the_cgroup():
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = cpus.host_memory_limit()
    assert 0 < limit <= ram
    try:
        text = open("/sys/fs/cgroup/memory.max").read().strip()
    except OSError:
        return
    if text.isdigit():
        assert limit <= int(text)


def test_the_cli_default_is_auto(no_env, monkeypatch):
    monkeypatch.setattr(cpus, "host_memory_limit", lambda: 16 * GiB)
    p = argparse.ArgumentParser()
    add_engine_args(p)
    a = p.parse_args([])
    assert a.kv_cache_memory == "auto"
    assert engine_config_from_args(a).kv_cache_memory == 2 * GiB
    assert engine_config_from_args(p.parse_args(["--kv-cache-memory", "96MiB"])) \
        .kv_cache_memory == 96 << 20
