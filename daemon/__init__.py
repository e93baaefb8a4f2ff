"""captiond: caption image datasets by itself."""

__version__ = "0.1.0"
