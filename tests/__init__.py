"""ckptsync's test suite (a package, so that test modules import their support code as
``tests.support.<module>`` and equal basenames in different directories cannot collide).

unit/         one module through its API, named after it (``test_local.py`` tests local.py)
integration/  several modules together in this process, on real local directories and servers
conformance/  the remote store's protocol, written once, run on every backend (``store_remote``)
e2e/          what a user runs: subprocesses, SIGKILL, the demo, deploy/, the docs' commands
support/      servers, fault seams, helpers and scripts the tests use (no tests)
"""
