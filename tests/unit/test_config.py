"""ckptsync.config: ``TransferConfig`` precedence (arguments > ``CKPTSYNC_*`` > defaults) and
validation."""

from __future__ import annotations

import pytest

from ckptsync.config import TransferConfig
from ckptsync.errors import ConfigError

pytestmark = pytest.mark.core


def test_transfer_config_precedence() -> None:
    env = {"CKPTSYNC_MAX_WORKERS": "3", "CKPTSYNC_RETRIES": "9", "CKPTSYNC_GRACE": "60"}
    cfg = TransferConfig.resolve(env=env, retries=2, max_workers=None)
    assert (cfg.max_workers, cfg.retries, cfg.grace_s) == (3, 2, 60.0)
    assert TransferConfig.resolve(env={}) == TransferConfig()
    with pytest.raises(ConfigError, match="CKPTSYNC_MAX_WORKERS"):
        TransferConfig.resolve(env={"CKPTSYNC_MAX_WORKERS": "many"})
    with pytest.raises(ConfigError):
        TransferConfig(max_workers=0)
    with pytest.raises(ConfigError, match="unknown transfer setting"):
        TransferConfig.resolve(env={}, nope=1)
