"""MindSemantix: fMRI -> caption -> image, as a three-stage Lightning pipeline."""

__version__ = "0.1.0"
