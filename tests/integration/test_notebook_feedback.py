"""What a notebook shows a user: short reprs, one line saying where a run resumed from, and a
status that knows what a restore pulled.

``print(info)`` must not dump the restored tensors (megabytes for a real model); ``restore``
says in one INFO line which step it resumed from, from where, how big and that it was
verified; after a restore that pulled from the remote, ``status()`` names that checkpoint on
both sides; no repr carries a credential of the remote URL.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from ckptsync import Checkpointer
from ckptsync.remote import RemoteStore
from tests.support.remotes import Remote

pytestmark = pytest.mark.core

SECRET = "hunter2"


def model_10m() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1000, 5000), torch.nn.Linear(5000, 1000))
    assert sum(p.numel() for p in model.parameters()) > 10_000_000
    return model


def test_reprs_stay_short_and_restore_says_where_it_resumed_from(
        tmp_path: Path, memory_remote: Remote, caplog: pytest.LogCaptureFixture) -> None:
    url = f"memory://user:{SECRET}@{memory_remote.url.removeprefix('memory://')}"
    model = model_10m()
    with Checkpointer(tmp_path / "a", remote_store=RemoteStore(url)) as ck:
        ck.save(150, model=model).wait()
        assert ck.wait()
        shown = repr(ck)
    assert len(shown) < 300, shown
    assert str(tmp_path / "a") in shown and "step 150" in shown, shown
    assert memory_remote.url in shown and SECRET not in shown, shown

    # A fresh machine: nothing local, the remote holds step 150.
    fresh = model_10m()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    caplog.set_level(logging.INFO, logger="ckptsync")
    with Checkpointer(tmp_path / "b", remote_store=RemoteStore(url)) as ck:
        assert "newest='none'" in repr(ck)
        info = ck.restore(model=fresh)
        assert info is not None and info.step == 150
        for a, b in zip(fresh.parameters(), model.parameters(), strict=True):
            assert torch.equal(a, b)

        shown = repr(info)
        assert len(shown) < 300, shown
        assert info.name in shown and "step=150" in shown and "fell_back=False" in shown
        assert f"remote {memory_remote.url}" in shown and SECRET not in shown, shown
        assert "tensor" not in shown  # the state is in info.state, not in its repr

        resumed = [r.getMessage() for r in caplog.records if "resumed from" in r.getMessage()]
        assert len(resumed) == 1 and resumed[0].startswith(
            f"resumed from step 150 ({info.name}), pulled from {memory_remote.url}, "), resumed
        assert resumed[0].endswith(" MiB, verified") and SECRET not in resumed[0], resumed

        st = ck.status()
        assert (st.newest_remote, st.newest_remote_step) == (info.name, 150), st
        assert (st.newest_local, st.newest_local_step) == (info.name, 150), st
        assert not st.behind
        assert repr(st) == (f"SyncStatus(remote='{memory_remote.url}', local=step 150, "
                            "remote_has=step 150, in sync)")
        assert "step 150" in repr(ck)


def test_a_local_restore_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = torch.nn.Linear(4, 3)
    with Checkpointer(tmp_path) as ck:
        ck.save(7, model=model).wait()
    caplog.set_level(logging.INFO, logger="ckptsync")
    with Checkpointer(tmp_path) as ck:
        info = ck.restore(model=model)
        assert info is not None
        assert repr(info) == (f"RestoreInfo(name={info.name!r}, step=7, from='local', "
                              "fell_back=False)")
        assert repr(ck.status()) == "SyncStatus(no remote)"
    resumed = [r.getMessage() for r in caplog.records if "resumed from" in r.getMessage()]
    assert resumed == [f"resumed from step 7 ({info.name}), local copy in {tmp_path}, "
                       f"{info.manifest.total_size / 1024:.1f} KiB, verified"]
