"""``make soak`` (``python -m tests.support.soak.soak``) and its trainer; test_soak_quick runs
its quick form."""
