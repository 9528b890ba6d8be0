"""The transactional outbox: services publish events, the core delivers them as webhooks.

A service turns it on by naming an :class:`Outbox` in its ``ServiceSpec`` and giving its settings
the :class:`WebhookSettings`; it then publishes its own event types in its own write transaction
with :meth:`Outbox.publish` (sync connection), :meth:`Outbox.publish_async` or
:meth:`Outbox.publish_many` (a batch). Delivery, HMAC signing (:mod:`.signatures`), retries,
leases, retention and ``GET /webhooks/deliveries`` come with it.
"""

from keel.core.outbox.publish import Outbox
from keel.core.outbox.settings import WebhookSettings
from keel.core.outbox.signatures import verify_signature

__all__ = ["Outbox", "WebhookSettings", "verify_signature"]
