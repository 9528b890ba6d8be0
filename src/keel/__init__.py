"""keel: three backend services that stay correct under load.

Each service (ledger, firehose, inventory) is its own ASGI app built on :mod:`keel.core`.
"""

__version__ = "0.1.0"
