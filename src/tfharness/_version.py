"""The package's version: its one source (pyproject.toml reads it from here), and a module of its
own so that modules inside the package can name it without importing the package's facade."""

__version__ = "0.1.0"
