"""The package version, kept in one place for setup.cfg and `tf_pfq.__version__`."""

__version__ = "0.1.0"
