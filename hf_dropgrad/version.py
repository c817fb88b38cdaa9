"""hf_dropgrad's version, in one place: the build reads it (pyproject.toml), the package face
re-exports it as ``hf_dropgrad.__version__``, and the modules that print it (the model card)
import :data:`VERSION` from here."""

__version__ = "0.2.0"

#: The same, under a public name.
VERSION = __version__
