"""The package version, in a module of its own: modules low in the layer order report it without
importing the package root (which loads the kernels)."""

__version__ = "0.1.0"
