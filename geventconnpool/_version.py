"""The single place that holds the package's version."""

__version__ = "1.0.0"
