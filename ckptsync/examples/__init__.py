"""Runnable examples that ship inside the package: the tiny GPT trainer ``ckptsync demo`` runs.

They live here, not only in the repository's ``examples/``, so that the demo works after a plain
``pip install "ckptsync[torch,demo]"``: ``python -m ckptsync.examples.train_tiny_lm --help``.
Each example imports torch when it is run or imported, never through ``import ckptsync``.
"""
