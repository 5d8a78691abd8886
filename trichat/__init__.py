"""trichat: a small, self-hostable, distributed chat server on Trio."""

__version__ = "0.1.0"
