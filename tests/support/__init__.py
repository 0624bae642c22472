"""Support code for the tests (no tests here). Import a module by its full name,
``from tests.support.servers import SeaweedFS``; this package imports nothing itself, so a
subprocess that needs one module does not load torch or start anything.

paths.py         REPO, PY and ``child_env``: where things are and how subprocesses find them
cli.py           ``cli``/``cli_env``: the ``ckptsync`` command line in a subprocess
remotes.py       ``Remote`` (an fsspec URL plus storage options) and fsspec cache clearing
servers.py       SeaweedFS, moto and fake-gcs-server on 127.0.0.1, and the exception table
drive_double.py  an in-process Google Drive v3 double (HTTPS proxy, TLS, token endpoint)
drive_state.py   the Drive double's file tree and its ``q`` query language
faults.py        ``FaultFS``: an fsspec wrapper that fails, truncates or delays the Nth call
fault_proxy.py   ``FaultProxy``: a fault-injecting TCP/HTTP proxy in front of a real server
faultkit.py      seeded chaos runs through ``FaultProxy`` and what they must leave behind
formats.py       writing checkpoints in older formats (v1) and sealing manifests, torch-free
helpers.py       training states, exact comparisons, ``FileOps`` seams, crash and DDP drivers
jsonlines.py     reading the CLI's ``--json`` output (JSON Lines, a summary last)
no_torch.py      a pytest plugin (``-p tests.support.no_torch``) under which torch cannot load
stores.py        the conformance suite's ``store_remote`` backends and its small helpers
watchkit.py      ``ckptsync watch`` subprocesses, torch-free checkpoints, /proc readings
slowfs.py        ``slowfile://``: a local fsspec filesystem whose writes sleep
scripts/         programs the tests run by path: run_daemon.py, zc_trainer.py
soak/            ``make soak`` and its trainer
"""
