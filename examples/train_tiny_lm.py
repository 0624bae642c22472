"""Train a tiny MiniMind-style GPT on a bundled text corpus, with exact resume via ckptsync.

The trainer ships inside the package, so that ``ckptsync demo`` works after a plain
``pip install``: read it in ``ckptsync/examples/train_tiny_lm.py`` (the lines that use ckptsync
are marked ``# ckptsync``). This file runs it, and re-exports its pieces for the other examples:

    python examples/train_tiny_lm.py --ckpt-dir ckpts --steps 200 --save-every 20
    # ... killed at any moment (Colab timeout, spot VM pre-emption, kill -9) ...
    python examples/train_tiny_lm.py --ckpt-dir ckpts --steps 200 --save-every 20 --resume
"""

from __future__ import annotations

from ckptsync.examples.train_tiny_lm import (
    DATA,
    CharTokenizer,
    RandomBatches,
    TinyGPT,
    main,
    parse_args,
)

__all__ = ["DATA", "CharTokenizer", "RandomBatches", "TinyGPT", "main", "parse_args"]

if __name__ == "__main__":
    main()
