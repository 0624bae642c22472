"""The package version, in a module of its own so that any module can import it without
importing the ``ckptsync`` package's ``__init__`` (which would be an import cycle)."""

__version__ = "0.1.0"
