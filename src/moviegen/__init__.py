"""moviegen: an open PyTorch implementation of Meta's Movie Gen Video."""

__version__ = "0.1.0"
