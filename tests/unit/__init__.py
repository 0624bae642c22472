"""Unit tests: one ckptsync module through its API, each file named after the module."""
