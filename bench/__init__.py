"""ckptsync benchmarks against the tools users would pick instead (run by ``make bench``)."""
