"""emlisten: keeps a live subscription to every registered mailbox and delivers each new email."""

__version__ = "0.1.0"

__all__ = ["__version__"]
