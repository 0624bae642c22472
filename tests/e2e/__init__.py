"""End-to-end tests: ckptsync as a user runs it (subprocess trainers and daemons, SIGKILL,
``ckptsync demo``, deploy/, the README's commands, the soak's quick form)."""
