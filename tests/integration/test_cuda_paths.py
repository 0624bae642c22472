"""The GPU paths, tested where CUDA is present and skipped (with the reason) where it is not:
this project's CI machines have no GPU, so these run only on a developer's GPU machine.

- The snapshot's CPU buffers for CUDA tensors are pinned (so the copy can run without
  blocking) and reused from save to save.
- The CUDA RNG state of every device is saved and restored: the next draws repeat exactly.
- A checkpoint of CUDA tensors restores onto the CPU (``map_location="cpu"``) and back onto
  the GPU bit-exact.

The sharded (DCP) GPU path stages through DCP's ``DefaultStager`` with pinned memory where
CUDA is present (client/sharded.py); the snapshot's other-device synchronization is in
test_snapshot_cuda.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ckptsync import Checkpointer
from ckptsync.client.state import SnapshotBuffers

pytestmark = pytest.mark.core

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
def test_snapshot_buffers_of_cuda_tensors_are_pinned_and_reused() -> None:
    bufs = SnapshotBuffers()
    w = torch.randn(1024, device="cuda")
    first = bufs.snapshot("model", {"w": w})["w"]
    assert first.device.type == "cpu" and first.is_pinned()
    assert torch.equal(first, w.cpu())
    w.add_(1.0)
    second = bufs.snapshot("model", {"w": w})["w"]
    assert second.data_ptr() == first.data_ptr()  # the same buffer, refilled
    assert torch.equal(second, w.cpu())


@needs_cuda
def test_cuda_rng_of_every_device_is_restored(tmp_path: Path) -> None:
    model = torch.nn.Linear(8, 8).cuda()
    with Checkpointer(tmp_path / "ckpts") as c:
        c.save(step=1, model=model)
        c.wait()
    expected = [torch.randn(16, device=f"cuda:{i}") for i in range(torch.cuda.device_count())]
    for i in range(torch.cuda.device_count()):
        torch.randn(1000, device=f"cuda:{i}")  # move every device's generator on
    with Checkpointer(tmp_path / "ckpts") as c:
        assert c.restore(model=model) is not None
    again = [torch.randn(16, device=f"cuda:{i}") for i in range(torch.cuda.device_count())]
    assert all(torch.equal(a, b) for a, b in zip(expected, again, strict=True))


@needs_cuda
def test_a_cuda_checkpoint_restores_on_cpu_and_back_bit_exact(tmp_path: Path) -> None:
    model = torch.nn.Linear(64, 64).cuda()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 64, device="cuda")).sum().backward()
    opt.step()
    with Checkpointer(tmp_path / "ckpts", rng=False) as c:
        c.save(step=3, model=model, optimizer=opt)
        c.wait()
    on_cpu = torch.nn.Linear(64, 64)
    with Checkpointer(tmp_path / "ckpts", rng=False) as c:
        info = c.restore(model=on_cpu, map_location="cpu")
    assert info is not None and info.step == 3
    assert all(torch.equal(a, b.cpu()) for a, b in zip(on_cpu.state_dict().values(),
                                                        model.state_dict().values(), strict=True))
    back = torch.nn.Linear(64, 64).cuda()
    back_opt = torch.optim.AdamW(back.parameters())
    with Checkpointer(tmp_path / "ckpts", rng=False) as c:
        assert c.restore(model=back, optimizer=back_opt, map_location="cuda") is not None
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(),
                                                  model.state_dict().values(), strict=True))
    s0, s1 = opt.state_dict()["state"], back_opt.state_dict()["state"]
    assert all(torch.equal(s0[k]["exp_avg"], s1[k]["exp_avg"]) for k in s0)
