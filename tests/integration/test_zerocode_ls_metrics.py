"""Zero-code checkpoints in ``ls`` show the files they hold and the metrics the
framework recorded (a Hugging Face ``trainer_state.json``'s log history, the monitored value in
a Lightning checkpoint's file name), so that remote keep-best ranks them as it ranks native
checkpoints. A real ``watch --once`` with the presets, a file:// remote."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.support.cli import run_cli
from tests.support.jsonlines import events

pytestmark = pytest.mark.core


def hf_checkpoint(out: Path, step: int, eval_loss: float) -> None:
    d = out / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "pytorch_model.bin").write_bytes(os.urandom(5000))
    (d / "optimizer.pt").write_bytes(os.urandom(3000))
    (d / "trainer_state.json").write_text(json.dumps({  # written last, as the Trainer does
        "global_step": step, "best_metric": eval_loss,
        "log_history": [{"loss": 2.0, "step": step // 2},
                        {"loss": 1.0 + step / 1000, "learning_rate": 1e-4, "step": step},
                        {"eval_loss": eval_loss, "epoch": step / 100, "step": step}]}))


def test_hf_trainer_versions_carry_their_metrics_and_keep_best_ranks_them(
        tmp_path: Path) -> None:
    out = tmp_path / "out"
    url = f"file://{tmp_path}/remote/run"
    for step, loss in ((100, 0.9), (200, 0.4), (300, 0.6)):  # one save, one sync, each
        hf_checkpoint(out, step, loss)
        p = run_cli("watch", str(out), url, "--preset", "hf-trainer", "--once")
        assert p.returncode == 0, p.stderr
    p = run_cli("ls", url, "--json")
    rows = events(p.stdout, "checkpoint")
    assert [r["step"] for r in rows] == [100, 200, 300]
    assert [r["metrics"]["eval_loss"] for r in rows] == [0.9, 0.4, 0.6]
    assert rows[0]["metrics"] == {"loss": 1.1, "learning_rate": 1e-4, "eval_loss": 0.9,
                                  "epoch": 1.0, "best_metric": 0.9}
    assert sorted(rows[0]["paths"]) == ["checkpoint-100/optimizer.pt",
                                        "checkpoint-100/pytorch_model.bin",
                                        "checkpoint-100/trainer_state.json"]
    text = run_cli("ls", url).stdout
    assert "checkpoint-100/" in text and "eval_loss=0.9" in text
    p = run_cli("gc", url, "--keep-last", "1", "--keep-best", "eval_loss:min:1", "--dry-run",
                "--json")
    assert p.returncode == 0, p.stderr
    deleted = [e["name"] for e in events(p.stdout, "would_delete")]
    kept = {e["name"]: e["reasons"] for e in events(p.stdout, "would_keep")}
    assert deleted == [rows[0]["name"]]
    assert kept[rows[1]["name"]] == ["keep-best eval_loss:min:1 (0.4)"]


def test_lightning_file_names_carry_the_monitored_value(tmp_path: Path) -> None:
    from ckptsync.zerocode.metrics import name_metrics

    assert name_metrics("epoch=3-step=32-val_loss=0.123.ckpt") == {"epoch": 3.0,
                                                                  "val_loss": 0.123}
    assert name_metrics("last.ckpt") == {} and name_metrics("model-v1.ckpt") == {}
    root = tmp_path / "lightning"
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "epoch=3-step=32-val_loss=0.250.ckpt").write_bytes(os.urandom(800))
    url = f"file://{tmp_path}/remote/run"
    p = run_cli("watch", str(root), url, "--preset", "lightning", "--once")
    assert p.returncode == 0, p.stderr
    (row,) = events(run_cli("ls", url, "--json").stdout, "checkpoint")
    assert row["metrics"] == {"epoch": 3.0, "val_loss": 0.25}
    assert row["paths"] == ["checkpoints/epoch=3-step=32-val_loss=0.250.ckpt"]


def test_an_unreadable_trainer_state_has_no_metrics(tmp_path: Path) -> None:
    from ckptsync.zerocode.metrics import trainer_state_metrics

    bad = tmp_path / "trainer_state.json"
    bad.write_text("{not json")
    assert trainer_state_metrics(bad) == {}
    bad.write_text(json.dumps({"log_history": [{"loss": float("nan"), "eval_loss": 0.5}]}))
    assert trainer_state_metrics(bad) == {"eval_loss": 0.5}
