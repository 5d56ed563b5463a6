"""The version, in a module of its own: anything may read it without importing the package face."""

__version__ = "0.1.0"
