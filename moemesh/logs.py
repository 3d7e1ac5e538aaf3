"""One log format for every moemesh process: time, service, level, message (to stderr)."""

from __future__ import annotations

import logging


def setup_logging(service: str, level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s",
    )
