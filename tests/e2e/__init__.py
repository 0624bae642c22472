"""End-to-end tests: ckptsync as a user runs it (subprocess trainers and daemons, SIGKILL,
``ckptsync demo``, deploy/, the commands of the README and docs/, the soak's quick form)."""
