"""Helpers shared by the example scripts (argument parsing, URL joining)."""

from __future__ import annotations

import argparse
import os


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--root", required=False, default=None,
                   help="folder or URL prefix for the stores (local path, s3://bucket/prefix, memory://...)")
    p.add_argument("--endpoint-url", default=None,
                   help="S3-compatible endpoint (e.g. a MinIO or moto server); credentials come from the environment")
    p.add_argument("--tiny", action="store_true", help="tiny data (what the test suite runs)")
    return p


def storage_options(args) -> dict | None:
    """fsspec options for ``--root``: only the endpoint; credentials stay in the environment."""
    if args.endpoint_url:
        return {"client_kwargs": {"endpoint_url": args.endpoint_url}}
    return None


def join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if "://" in root else os.path.join(root, name)
