"""Conformance: the remote store's commit protocol, written once and run on every backend
through the ``store_remote`` fixture (conftest.py here), split by concern."""
