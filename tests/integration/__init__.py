"""Integration tests: the client, the daemon and zero-code mode in this process, on real local
directories and real remotes (file://, local servers), with fault seams where needed."""
