"""Process settings: thread count from the usable cores, glibc allocator settings kept for children."""

from __future__ import annotations

import os
import platform

import pytest

from mgdm_core import runtime


def test_cpu_threads_follows_omp_num_threads_when_set(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runtime.cpu_threads() == 3


def test_cpu_threads_splits_usable_cores_among_local_processes(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert runtime.cpu_threads() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert runtime.cpu_threads() == 1  # never zero


def test_export_malloc_settings_keeps_values_the_user_set():
    env = {"MALLOC_TRIM_THRESHOLD_": "0"}
    runtime.export_malloc_settings(env)
    assert env["MALLOC_TRIM_THRESHOLD_"] == "0"
    assert env["MALLOC_MMAP_THRESHOLD_"] == str(32 * 2**20)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_tune_malloc_is_accepted_by_glibc(monkeypatch):
    for name in runtime.MALLOC_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert runtime.tune_malloc()
