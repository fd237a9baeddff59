"""The package version, in a module of its own: the checkpoint writers record it (``producer``, the manifest) and
must not import the package's ``__init__``, which sits above them (it loads the ModelOpt backend and the exporter)."""

__version__ = "0.1.0"
