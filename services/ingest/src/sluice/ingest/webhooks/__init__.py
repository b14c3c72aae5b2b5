"""Provider delivery webhooks (SES via SNS, Resend, SendGrid) and one-click unsubscribe.

Requests are verified first (signatures, timestamps, topics), then parsed into
:class:`~sluice.ingest.webhooks.events.DeliveryEvent` values, then stored and applied in
batches by :mod:`sluice.ingest.webhooks.repository`.
"""
