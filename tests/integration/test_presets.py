"""``ckptsync watch --preset NAME``: each framework's own save (real Transformers, Lightning,
Accelerate, DCP on CPU; tests/support/scripts/preset_frameworks.py) in a watched directory,
the remote ends with the newest version complete, and ``ckptsync pull`` into an empty
directory restores it so that the framework's own resume continues from it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ckptsync import start_watcher
from ckptsync.daemon import WatchConfig
from ckptsync.errors import ConfigError
from ckptsync.remote import RemoteStore
from ckptsync.zerocode.presets import PRESETS
from tests.support.remotes import Remote
from tests.support.watchkit import PY, SCRIPTS, child_env, run_cli

pytestmark = [pytest.mark.usefixtures("no_process_leak"), pytest.mark.full]

FRAMEWORKS = SCRIPTS / "preset_frameworks.py"
#: preset -> the files of the newest version after 4 steps saved every 2
NEWEST = {
    "hf-trainer": ["checkpoint-4/trainer_state.json", "checkpoint-4/model.safetensors",
                   "checkpoint-4/optimizer.pt"],
    "lightning": ["checkpoints/last.ckpt", "checkpoints/epoch=1-step=4.ckpt"],
    "accelerate": ["checkpoints/checkpoint_1/random_states_0.pkl",
                   "checkpoints/checkpoint_1/custom_checkpoint_0.pkl",
                   "checkpoints/checkpoint_1/model.safetensors"],
    "dcp": ["step_4/.metadata", "step_4/__0_0.distcp"],
}


def _framework(name: str, out: Path, *args: str) -> str:
    done = subprocess.run([PY, str(FRAMEWORKS), name, "--dir", str(out), *args],
                          env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_syncs_the_frameworks_checkpoints_and_the_framework_resumes_from_a_pull(
        tmp_path: Path, file_remote: Remote, preset: str) -> None:
    out = tmp_path / "run"
    out.mkdir()
    w = start_watcher(out, file_remote.url, presets=[preset], settle=0.3, interval=0.5,
                      log_path=tmp_path / "daemon.log")
    try:
        assert "trained to step 4" in _framework(preset, out, "--steps", "4")
        w.flush(timeout=120)
    finally:
        assert w.stop() == 0, (tmp_path / "daemon.log").read_text()

    store = RemoteStore(file_remote.url)
    versions = [m for m in store.list() if m.source.get("kind") == "watched"]
    assert versions, (tmp_path / "daemon.log").read_text()
    newest = versions[-1]
    assert newest.source["rule"] == PRESETS[preset]
    store.verify(newest.name, full=True)
    assert set(NEWEST[preset]) <= {f.path for f in newest.files}

    fresh = tmp_path / "fresh"
    pulled = run_cli("pull", file_remote.url, str(fresh), "--preset", preset)
    assert pulled.returncode == 0, pulled.stderr
    if preset == "dcp":
        assert "dcp equal step 4" in _framework(preset, fresh, "--resume")
    else:
        resumed = _framework(preset, fresh, "--steps", "6", "--resume")
        assert "resumed from step 4" in resumed and "trained to step 6" in resumed, resumed


@pytest.mark.core
def test_unknown_preset_is_a_usage_error_naming_the_presets(tmp_path: Path) -> None:
    done = run_cli("watch", str(tmp_path), f"file://{tmp_path}/remote", "--once",
                   "--preset", "keras")
    assert done.returncode == 2
    assert "keras" in done.stderr and all(name in done.stderr for name in PRESETS)


@pytest.mark.core
def test_help_lists_every_preset_with_its_rule() -> None:
    done = run_cli("watch", "--help")
    assert done.returncode == 0
    for name, rule in PRESETS.items():
        assert f"--preset {name}" in done.stdout and rule in done.stdout


@pytest.mark.core
def test_presets_from_flags_env_and_config_file_add_to_the_rules(tmp_path: Path) -> None:
    cfg = tmp_path / "watch.toml"
    cfg.write_text('[watch]\npresets = ["dcp"]\n')
    base = {"local_dir": tmp_path / "run", "remote": f"file://{tmp_path}/remote"}
    flags = WatchConfig.resolve({**base, "rules": ["file:a.pt"], "presets": ["lightning"]},
                                env={})
    assert [r.spec for r in flags.rules] == ["file:a.pt", PRESETS["lightning"]]
    env = WatchConfig.resolve(base, env={"CKPTSYNC_PRESETS": "hf-trainer, accelerate"})
    assert [r.spec for r in env.rules] == [PRESETS["hf-trainer"], PRESETS["accelerate"]]
    assert [r.spec for r in WatchConfig.resolve({**base, "config": str(cfg)}, env={}).rules] \
        == [PRESETS["dcp"]]
    with pytest.raises(ConfigError, match=r"unknown preset 'x'.*accelerate, dcp"):
        WatchConfig.resolve(base, env={"CKPTSYNC_PRESETS": "x"})
    with pytest.raises(ConfigError, match="unknown preset"):
        start_watcher(tmp_path / "run", f"file://{tmp_path}/remote", presets=["x"])
