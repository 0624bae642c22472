"""The Lightning ``CheckpointIO`` plugin with the real framework.

A run killed mid-epoch (SIGKILL) whose local directory is then deleted resumes from the remote
to the same step and the same final weights as an uninterrupted run; the remote follows what
``ModelCheckpoint`` keeps (``save_top_k``) without touching anything ckptsync did not write;
a file missing locally is pulled on load; uploads that did not make it are reported by name.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptsync.errors import NoCheckpointError
from ckptsync.integrations.lightning import RULE, CkptSyncCheckpointIO, pull_latest
from ckptsync.ownership import RUN_FILE
from ckptsync.remote import RemoteStore
from ckptsync.zerocode import restore_watched
from tests.support.paths import child_env
from tests.support.remotes import Remote

pytestmark = pytest.mark.core

pl = pytest.importorskip("lightning.pytorch")


def run(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tests.support.lightning_run", *args],
                          cwd=tmp, capture_output=True, text=True, timeout=600,
                          env=child_env())


def remote_files(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, int]:
    """Path -> step of every version of the lightning rule the remote holds."""
    out: dict[str, int] = {}
    for m in RemoteStore(url, storage_options).list():
        assert m.source.get("rule") == RULE, m.source
        (path,) = m.source["paths"]
        assert path not in out, f"two versions of {path} kept remotely"
        out[path] = m.step
    return out


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)  # type: ignore[no-any-return]


@pytest.mark.full
@pytest.mark.full
def test_killed_run_resumes_from_the_remote_to_the_same_final_weights(tmp_path: Path) -> None:
    ref = run(tmp_path, "--dir", "a", "--remote", f"file://{tmp_path}/ra", "--out", "wa.pt")
    assert ref.returncode == 0, ref.stderr[-3000:]

    killed = run(tmp_path, "--dir", "b", "--remote", f"file://{tmp_path}/rb",
                 "--kill-at-epoch", "3")
    assert killed.returncode == -9, killed.stderr[-3000:]
    shutil.rmtree(tmp_path / "b")  # a fresh machine: only the bucket is left

    resumed = run(tmp_path, "--dir", "b", "--remote", f"file://{tmp_path}/rb", "--resume",
                  "--out", "wb.pt")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 12" in resumed.stdout, resumed.stdout  # end of epoch 2
    assert "final step 24" in resumed.stdout and "final step 24" in ref.stdout
    wa, wb = weights(tmp_path / "wa.pt"), weights(tmp_path / "wb.pt")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k

    # The remote follows the local directory: the newest version of each file
    # ModelCheckpoint kept (top 2 + last), none of those it deleted, no older versions.
    local = {p.name for p in (tmp_path / "b").glob("*.ckpt")}
    assert set(remote_files(f"file://{tmp_path}/rb")) == local
    assert remote_files(f"file://{tmp_path}/rb")["last.ckpt"] == 24
    # ... and `ckptsync pull` puts last.ckpt back byte for byte.
    restore_watched(RemoteStore(f"file://{tmp_path}/rb"), tmp_path / "pulled")
    assert (tmp_path / "pulled" / "last.ckpt").read_bytes() == \
        (tmp_path / "b" / "last.ckpt").read_bytes()


def fit(dirpath: Path, io: CkptSyncCheckpointIO, epochs: int) -> Any:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.support.lightning_run import Tiny

    pl.seed_everything(0)
    model = Tiny()
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, plugins=[io], logger=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=dirpath, save_last=True, save_top_k=1,
                                   monitor="train_loss", filename="{epoch}-{step}")])
    trainer.fit(model)
    return model


def test_s3_remote_follows_top_k_and_a_fresh_machine_loads_from_it(
        tmp_path: Path, s3_remote: Remote) -> None:
    url, so = s3_remote.url, s3_remote.storage_options
    store = RemoteStore(url, so)
    foreign = store.at.path("notes.txt")
    store.fs.pipe_file(foreign, b"not ckptsync's")  # under the root, not ours: never touched
    model = fit(tmp_path / "m1", CkptSyncCheckpointIO(url, storage_options=so), epochs=4)

    local = sorted(p.name for p in (tmp_path / "m1").glob("*.ckpt"))
    assert len(local) == 2 and "last.ckpt" in local  # top-1 + last; older top-1s deleted
    assert sorted(remote_files(url, so)) == local
    store.fs.invalidate_cache()
    assert store.fs.cat_file(foreign) == b"not ckptsync's"

    # Plain Lightning loads what the plugin wrote.
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    plain = TorchCheckpointIO().load_checkpoint(tmp_path / "m1" / "last.ckpt",
                                                weights_only=False)
    assert plain["global_step"] == 16

    # A fresh machine: load_checkpoint of a missing file pulls it first.
    io2 = CkptSyncCheckpointIO(url, storage_options=so)
    ckpt = io2.load_checkpoint(tmp_path / "m2" / "last.ckpt", weights_only=False)
    io2.teardown()
    assert ckpt["global_step"] == 16
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt["state_dict"][k], v), k
    assert (tmp_path / "m2" / "last.ckpt").read_bytes() == \
        (tmp_path / "m1" / "last.ckpt").read_bytes()


def test_pull_latest_restores_last_ckpt_and_keeps_a_newer_local_one(
        tmp_path: Path, file_remote: Remote) -> None:
    url = file_remote.url
    assert pull_latest(url, tmp_path / "empty") is None
    io = CkptSyncCheckpointIO(url)
    io.save_checkpoint({"global_step": 5, "w": torch.ones(3)}, tmp_path / "m1" / "best.ckpt")
    io.save_checkpoint({"global_step": 5, "w": torch.ones(3)}, tmp_path / "m1" / "last.ckpt")
    io.teardown()

    got = pull_latest(url, tmp_path / "m2")
    assert got == tmp_path / "m2" / "last.ckpt"
    # What fit(ckpt_path="last") reads: last.ckpt, and the newest top-k file beside it.
    assert sorted(p.name for p in (tmp_path / "m2").iterdir() if p.name != RUN_FILE) == [
        "best.ckpt", "last.ckpt"]
    assert torch.equal(torch.load(got)["w"], torch.ones(3))

    # The local file is newer than the remote one (its upload did not finish): kept.
    torch.save({"global_step": 9, "w": torch.zeros(3)}, tmp_path / "m2" / "last.ckpt")
    assert pull_latest(url, tmp_path / "m2") == tmp_path / "m2" / "last.ckpt"
    assert torch.equal(torch.load(got)["w"], torch.zeros(3))

    with pytest.raises(NoCheckpointError, match=r"other\.ckpt"):
        CkptSyncCheckpointIO(url).load_checkpoint(tmp_path / "m3" / "other.ckpt")


def test_teardown_names_the_files_that_are_not_remote(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("a file where the bucket should be")
    io = CkptSyncCheckpointIO(f"file://{tmp_path}/not-a-dir/run", teardown_timeout=3)
    io.save_checkpoint({"global_step": 3, "w": torch.ones(2)}, tmp_path / "ck" / "last.ckpt")
    # The local save does not depend on the remote: the file is whole and loadable.
    assert torch.equal(torch.load(tmp_path / "ck" / "last.ckpt")["w"], torch.ones(2))
    with pytest.warns(RuntimeWarning, match=r"NOT in .*not-a-dir.*last\.ckpt"):
        io.teardown()


def test_what_a_run_could_not_upload_is_uploaded_by_the_next_run(tmp_path: Path) -> None:
    blocker = tmp_path / "bucket"
    blocker.write_text("a file where the bucket will be")  # the remote is unreachable...
    url = f"file://{blocker}/run"
    io = CkptSyncCheckpointIO(url, teardown_timeout=2)
    io.save_checkpoint({"global_step": 7, "w": torch.ones(2)}, tmp_path / "ck" / "last.ckpt")
    with pytest.warns(RuntimeWarning, match="last.ckpt"):
        io.teardown()
    blocker.unlink()  # ... until the next run

    io2 = CkptSyncCheckpointIO(url)
    io2.save_checkpoint({"global_step": 8, "w": torch.zeros(2)}, tmp_path / "ck" / "best.ckpt")
    io2.teardown()
    assert remote_files(url) == {"last.ckpt": 7, "best.ckpt": 8}


def test_without_lightning_the_error_names_the_extra(tmp_path: Path) -> None:
    code = ("import sys\n"
            "for m in ('lightning', 'lightning_fabric', 'pytorch_lightning'):\n"
            "    sys.modules[m] = None\n"
            "from ckptsync.errors import ConfigError\n"
            "from ckptsync.integrations.lightning import CkptSyncCheckpointIO\n"
            "try:\n"
            "    CkptSyncCheckpointIO('file:///tmp/x/run')\n"
            "except ConfigError as e:\n"
            "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=child_env(), cwd=tmp_path)
    assert "ckptsync[lightning]" in out.stdout, out.stderr[-2000:]
