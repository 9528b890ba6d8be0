"""``keel`` with the toy registered beside the real services: run as ``python -c``."""

from __future__ import annotations

import os

from keel.cli import build_app
from keel.registry import services
from tests.support.toy.registration import SERVICE

# TOY_ONLY=1: the toy alone, so `keel run` binds no real service's port.
entries = {"toy": SERVICE} if os.environ.get("TOY_ONLY") else {**services(), "toy": SERVICE}
app = build_app(entries)
