"""A pytest plugin that makes ``import torch`` fail: ``pytest -p tests.support.no_torch``.

``make test-floors`` runs the remote conformance suite with it, so that the suite (and the
daemon side it drives) is shown to need no torch even where torch is installed.
"""

from __future__ import annotations

import sys

sys.modules["torch"] = None  # type: ignore[assignment]  # None: "import torch" raises
