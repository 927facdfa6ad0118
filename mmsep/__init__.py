"""mmsep: deployment package for MMAudioSep (video/text-queried sound separation)."""

__version__ = "0.1.0"
