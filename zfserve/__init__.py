"""zfserve: fast inference and visualization for ZFNet-style convolutional networks."""

__version__ = "0.1.0"
