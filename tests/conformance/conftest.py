"""Conformance: the remote store's protocol, written once against ``store_remote`` and run on
every backend in ``STORE_BACKENDS`` (tests/support/stores.py; the servers are tests/conftest.py's).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.remotes import backend_params
from tests.support.stores import STORE_BACKENDS


@pytest.fixture(params=backend_params(STORE_BACKENDS))
def store_remote(request: pytest.FixtureRequest) -> Any:
    """A conftest ``Remote`` for each backend in ``STORE_BACKENDS``."""
    return request.getfixturevalue(f"{request.param}_remote")
