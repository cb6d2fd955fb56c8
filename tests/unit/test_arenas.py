"""Page-locking arenas (``PageLocker``) against a stand-in for the CUDA runtime: at once or on a background
thread while the next arena fills, in order, within the page-lock limit, every arena settled when the fill ends."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from vramferry.runtime.arenas import PageLocker, host_buffer


class FakeRuntime:
    """``cudaHostRegister`` / ``cudaHostUnregister`` that record what they were given, slowly, and which thread."""

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.delay = delay
        self.fail = fail
        self.registered: list[tuple[int, int, int]] = []
        self.threads: set[str] = set()
        self.unregistered: list[int] = []

    def cudaHostRegister(self, ptr: int, size: int, flags: int) -> int:  # noqa: N802 (the CUDA name)
        time.sleep(self.delay)
        self.threads.add(threading.current_thread().name)
        if self.fail:
            return 2  # cudaErrorMemoryAllocation
        self.registered.append((ptr, size, flags))
        return 0

    def cudaHostUnregister(self, ptr: int) -> int:  # noqa: N802
        self.unregistered.append(ptr)
        return 0


@pytest.fixture
def runtime(monkeypatch):
    fake = FakeRuntime()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    return fake


def test_arenas_are_page_locked_in_the_background_in_order_and_settled_on_exit(runtime):
    runtime.delay = 0.2
    locker = PageLocker(pin=True)
    arenas = [host_buffer(size) for size in (4096, 8192, 12288)]
    kept: list[tuple[int, bool]] = []
    with locker.in_background():
        start = time.perf_counter()
        for arena in arenas:
            locker.lock("transformer", arena, lambda pinned, arena=arena: kept.append((arena.data_ptr(), pinned)))
        queued = time.perf_counter() - start
    assert queued < 0.2  # the caller went on while the first arena was still being page-locked
    assert kept == [(arena.data_ptr(), True) for arena in arenas]  # all settled on exit, in order
    assert [ptr for ptr, _size, _flags in runtime.registered] == [arena.data_ptr() for arena in arenas]
    assert runtime.threads and all(name.startswith("vramferry-pin") for name in runtime.threads)
    assert locker.pinned_bytes == 4096 + 8192 + 12288
    locker.unlock(arenas[0])
    assert runtime.unregistered == [arenas[0].data_ptr()] and locker.pinned_bytes == 8192 + 12288


def test_outside_the_background_an_arena_is_page_locked_at_once(runtime):
    locker = PageLocker(pin=True, portable=True)
    arena = host_buffer(4096)
    kept: list[bool] = []
    locker.lock("vae", arena, kept.append)
    assert kept == [True] and runtime.registered == [(arena.data_ptr(), 4096, 1)]  # portable: for every GPU
    assert runtime.threads == {threading.current_thread().name}


def test_arenas_past_the_limit_or_refused_stay_pageable_with_one_warning(runtime, caplog):
    locker = PageLocker(pin=True, pin_limit=10_000)
    kept: list[bool] = []
    with locker.in_background():
        for size in (8192, 8192):  # the second would pass the limit
            locker.lock("transformer", host_buffer(size), kept.append)
    assert kept == [True, False] and locker.pinned_bytes == 8192
    assert "page-lock limit" in caplog.text and "transformer" in caplog.text
    runtime.fail = True
    refused = PageLocker(pin=True)
    refused.lock("text_encoder", host_buffer(4096), kept.append)
    assert kept[-1] is False and refused.pinned_bytes == 0
    assert "cudaHostRegister failed" in caplog.text


def test_a_failure_in_the_background_reaches_the_caller(runtime):
    locker = PageLocker(pin=True)

    def broken(pinned: bool) -> None:
        raise RuntimeError("bookkeeping failed")

    with pytest.raises(RuntimeError, match="bookkeeping failed"):
        with locker.in_background():
            locker.lock("transformer", host_buffer(4096), broken)


def test_without_cuda_nothing_is_page_locked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    locker = PageLocker(pin=True)
    kept: list[bool] = []
    with locker.in_background():
        locker.lock("transformer", host_buffer(4096), kept.append)
    assert kept == [False] and locker.pinned_bytes == 0


def test_a_large_component_fills_several_arenas_each_page_locked_and_handed_on_once_filled(runtime, monkeypatch):
    from vramferry.runtime import arenas
    from vramferry.runtime.pieces import Piece
    from vramferry.runtime.refs import collect_refs
    from vramferry.runtime.store import HostStore

    monkeypatch.setattr(arenas, "ARENA_BYTES", 3 * 64 * 64 * 4 + 2048)  # three of the blocks below per arena
    torch.manual_seed(0)
    blocks = [torch.nn.Linear(64, 64, bias=False) for _ in range(8)]
    expected = [block.weight.detach().clone() for block in blocks]
    claimed: dict = {}
    pieces = [Piece(f"dit.{i}", "dit", collect_refs(b, set(), claimed)[0], b) for i, b in enumerate(blocks)]
    store = HostStore(pin=True)
    handed: list[list[str]] = []
    with store.locker.in_background():
        store.pack("dit", pieces, held=lambda held: handed.append([piece.name for piece in held]))
    # Arenas of three, three and two blocks, in order, each page-locked and then handed on.
    assert handed == [["dit.0", "dit.1", "dit.2"], ["dit.3", "dit.4", "dit.5"], ["dit.6", "dit.7"]]
    spans = sorted((ptr, ptr + size) for ptr, size, _flags in runtime.registered)
    assert len(spans) == 3 and all(end <= nxt for (_s, end), (nxt, _e) in zip(spans, spans[1:], strict=False))
    assert store.pinned_bytes == sum(size for _ptr, size, _flags in runtime.registered)
    assert store.pinned_bytes >= sum(piece.nbytes for piece in pieces)
    for block, weight in zip(blocks, expected, strict=True):
        assert torch.equal(block.weight, weight)  # bound to its copy in an arena
        ptr = block.weight.data_ptr()
        assert any(start <= ptr < end for start, end in spans)


@pytest.mark.parametrize("mode", ["model", "layerwise", "auto"])
def test_components_spread_over_many_arenas_give_the_resident_output(mode, monkeypatch):
    import vramferry
    from pipelines.diffusers_pipes import DIFFUSERS_PIPELINES, assert_runs_equal, run
    from vramferry.runtime import arenas

    monkeypatch.setattr(arenas, "ARENA_BYTES", 48 * 1024)  # a few blocks per arena: units span several
    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    expected = run(pipe, kwargs)
    with vramferry.apply(pipe, vramferry.OffloadConfig(mode=mode, onload_device="cpu", verify=True)) as handle:
        assert_runs_equal(pipe, kwargs, expected)
        assert handle.stats().bytes_h2d > 0
