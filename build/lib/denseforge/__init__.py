"""denseforge: dense, grounded captions for web images at scale."""

__version__ = "0.1.0"
