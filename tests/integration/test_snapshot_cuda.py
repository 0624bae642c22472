"""The snapshot waits for every device it copied from, not just the current one.

A snapshot copies CUDA tensors into pinned CPU buffers without blocking, then synchronizes;
the background thread serializes and hashes those buffers next. A copy from a device other
than the current one that is still running then would write (and hash) a mix of old and new
bytes. The tests read the buffers at once after ``snapshot`` returns, with the source device
kept busy so that an unsynchronized copy is still queued.
"""

from __future__ import annotations

import pytest
import torch

from ckptsync.client.state import SnapshotBuffers

pytestmark = pytest.mark.core


def test_cpu_tensors_need_no_device_synchronized() -> None:
    bufs = SnapshotBuffers()
    t = torch.arange(6.0)
    out = bufs.snapshot("model", {"w": t, "tied": t})
    assert torch.equal(out["w"], t) and out["tied"] is out["w"]
    assert bufs.synchronized == set()


def _busy(device: torch.device) -> None:
    """Queue a long kernel on ``device``'s current stream, ahead of the copy."""
    a = torch.randn(4096, 4096, device=device)
    for _ in range(20):
        a = a @ a
        a = a / a.norm()


def _snapshot_while_busy(source: torch.device) -> None:
    bufs = SnapshotBuffers()
    w = torch.zeros(64 * 1024 * 1024 // 4, device=source)
    bufs.snapshot("model", {"w": w})  # buffers now hold zeros
    w.fill_(1.0)
    expected = torch.ones(w.shape)
    _busy(source)
    out = bufs.snapshot("model", {"w": w})
    assert bufs.synchronized == {source}
    # Read at once, as the background thread does: every byte is the new one.
    assert torch.equal(out["w"], expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_snapshot_from_the_current_device_is_complete() -> None:
    _snapshot_while_busy(torch.device("cuda", torch.cuda.current_device()))


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs two CUDA devices (the copy from a non-current device)")
def test_snapshot_from_another_device_is_complete() -> None:
    with torch.cuda.device(0):
        _snapshot_while_busy(torch.device("cuda", 1))
