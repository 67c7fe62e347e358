"""Test and benchmark helpers: real servers on 127.0.0.1 (not used by the library itself)."""

from .s3 import LocalS3

__all__ = ["LocalS3"]
