"""A node's part of a multi-node checkpoint is never reported as synced before the
whole checkpoint is committed (ckptsync/parts.py).

With node 1 never uploading, nothing is restorable: node 0's in-process uploader
(``Checkpointer.status()`` / ``close()``), its ``ckptsync watch`` daemon (status file,
``ckptsync status``) and ``ckptsync push`` say "part uploaded, waiting for nodes [1]", never
synced; once node 1 uploads (its push commits the whole), both say synced.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import IO, cast

import pytest

from ckptsync.client.uploader import Uploader
from ckptsync.config import TransferConfig
from ckptsync.daemon import (
    EXIT_FAILED,
    EXIT_OK,
    EventLog,
    WatchConfig,
    Watcher,
    daemon_status,
    format_status,
)
from ckptsync.local import LocalCheckpoint
from ckptsync.parts import part_of
from ckptsync.remote import RemoteStore
from tests.support.daemon import InProcessDaemon
from tests.support.stores import make_node_parts
from tests.support.watchkit import wait_for

pytestmark = pytest.mark.core

NODE_FILES = [{".metadata": b"meta", "__0_0.distcp": os.urandom(20_000)},
              {"__1_0.distcp": os.urandom(30_000)}]
FAST = TransferConfig(retries=2, backoff_initial=0.05, backoff_max=0.2)


def _parts(tmp_path: Path, step: int) -> list[LocalCheckpoint]:
    return make_node_parts(tmp_path, step, NODE_FILES)


def _store(tmp_path: Path) -> RemoteStore:
    return RemoteStore(f"file://{tmp_path / 'remote'}", config=FAST)


def _part_up(tmp_path: Path, ckpt: LocalCheckpoint, node: int) -> bool:
    return (tmp_path / "remote" / ckpt.name / f"ckptsync-part-{node}.json").is_file()


def test_uploader_reports_a_part_as_waiting_until_the_last_node_commits(tmp_path: Path) -> None:
    a, b = _parts(tmp_path, 5)
    node0 = Uploader(_store(tmp_path))
    try:
        node0.offer(a)
        st = wait_for(lambda: _part_up(tmp_path, a, 0) and (s := node0.status()).in_flight
                      is None and s.pending is None and s, "node 0's part to be uploaded")
        assert st.newest_remote is None and st.behind  # not synced: nothing is restorable
        assert st.waiting_for_nodes == {a.name: (1,)}
        assert "waiting for nodes [1]" in st.lag()
        assert not node0.wait_idle(timeout=0.5)  # the newest checkpoint is not remote
        assert _store(tmp_path).list() == []

        node1 = Uploader(_store(tmp_path))  # node 1 uploads last: its push commits
        node1.offer(b)
        assert node1.wait_idle(timeout=60)
        assert node1.close() == () and node1.status().newest_remote == b.name

        st = wait_for(lambda: node0.status().newest_remote == a.name and node0.status(),
                      "node 0's uploader to see the whole checkpoint committed")
        assert st.waiting_for_nodes == {} and not st.behind
        assert node0.wait_idle(timeout=60)
    finally:
        assert node0.close() == ()
    (m,) = _store(tmp_path).list()
    assert m == part_of(a.manifest).whole  # type: ignore[union-attr]


def test_close_names_a_part_still_waiting_as_not_remote_with_the_reason(tmp_path: Path) -> None:
    a, _ = _parts(tmp_path, 6)
    node0 = Uploader(_store(tmp_path))
    node0.offer(a)
    wait_for(lambda: _part_up(tmp_path, a, 0) and node0.status().in_flight is None,
             "node 0's part to be uploaded")
    assert node0.close() == (a.name,)  # node 1 never uploads
    st = node0.status()
    assert st.not_remote == (a.name,) and st.newest_remote is None
    assert "waiting for nodes [1]" in st.not_remote_why[a.name]


def test_daemon_status_shows_a_part_waiting_for_nodes_until_the_last_node_commits(
        tmp_path: Path) -> None:
    a, b = _parts(tmp_path, 7)
    d = InProcessDaemon(tmp_path / "node0", store=_store(tmp_path), interval=0.3)
    try:
        st = wait_for(lambda: _part_up(tmp_path, a, 0) and not (
            s := daemon_status(d.local))["uploading"] and s, "node 0's daemon to upload its part")
        assert st["synced"] == [] and st["in_sync"] is False  # nothing is restorable
        assert st["pending"] == [] and st["waiting_for_nodes"] == {a.name: [1]}
        text = format_status(st)
        assert f"{a.name}: part uploaded, waiting for nodes [1]" in text
        assert "NOT in sync" in text

        assert _store(tmp_path).push(b).name == a.name  # node 1 uploads last: commits
        st = wait_for(lambda: (s := daemon_status(d.local))["synced"] == [a.name] and s,
                      "node 0's daemon to see the whole checkpoint committed at its next scan")
        assert st["waiting_for_nodes"] == {} and st["in_sync"] is True
        assert "in sync: every local checkpoint is committed" in format_status(st)
    finally:
        assert d.stop() == EXIT_OK


def test_watch_once_fails_while_a_part_waits_for_other_nodes(tmp_path: Path) -> None:
    a, _ = _parts(tmp_path, 8)
    store = _store(tmp_path)
    config = WatchConfig(local_dir=tmp_path / "node0", remote=store.url, interval=0.3, once=True)
    code = Watcher(config, store=store,
                   events=EventLog(cast(IO[str], io.StringIO()), fmt="json")).run()
    assert code == EXIT_FAILED  # nothing restorable: --once does not report success
    assert daemon_status(tmp_path / "node0")["waiting_for_nodes"] == {a.name: [1]}


def test_cli_push_of_a_part_says_it_waits_for_other_nodes(tmp_path: Path, capsys: object) -> None:
    from ckptsync.cli import main

    a, _ = _parts(tmp_path, 9)
    url = f"file://{tmp_path / 'remote'}"
    assert main(["push", str(tmp_path / "node0"), url]) == 0
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    assert f"{a.name}: part uploaded, waiting for nodes [1]" in out
    assert "1 pushed" not in out and "0 pushed" in out
