"""Each API key's webhook secret, and the Standard Webhooks signature made with it.

A key's secret is derived, not stored: `whsec_` + base64(HMAC-SHA256(TASKDOCK_WEBHOOK_SECRET,
key id)). So nothing new is kept in the database (a copy of it signs nothing), any process
with the setting can sign, and `taskdock keys webhook-secret` can show it again. Changing the
server secret rotates every key's at once; there is no rotation per key. Anonymous
submissions (auth off) belong to no key: TASKDOCK_WEBHOOK_ANONYMOUS_SECRET signs them when
set, so a laptop can fix a known secret, else the same derivation with the empty owner.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import datetime

from standardwebhooks import Webhook

from app.core.config import Environment, Settings
from app.core.errors import AppError

PREFIX = "whsec_"
# Only outside production, where no deployment's receivers trust it.
DEVELOPMENT_SECRET = "taskdock-development-webhook-secret"  # noqa: S105
_CONTEXT = b"taskdock-webhook-secret:"


class WebhooksOff(AppError):
    status_code = 422
    code = "webhooks_off"
    message = "webhooks need TASKDOCK_WEBHOOK_SECRET in production"


def enabled(settings: Settings) -> bool:
    return settings.webhook_secret is not None or settings.environment is not Environment.PRODUCTION


def secret_for(*, owner: str, settings: Settings) -> str:
    """The `whsec_…` secret that signs the webhooks of `owner`'s tasks ("" is anonymous)."""
    if not owner and settings.webhook_anonymous_secret is not None:
        return settings.webhook_anonymous_secret.get_secret_value()
    if settings.webhook_secret is not None:
        master = settings.webhook_secret.get_secret_value()
    elif enabled(settings):
        master = DEVELOPMENT_SECRET
    else:
        raise WebhooksOff()
    digest = hmac.new(master.encode(), _CONTEXT + owner.encode(), hashlib.sha256).digest()
    return PREFIX + base64.b64encode(digest).decode()


def signature(*, secret: str, message_id: str, timestamp: datetime, body: str) -> str:
    """The `webhook-signature` header: `v1,<base64 HMAC-SHA256>` of id, timestamp and body."""
    return Webhook(secret).sign(message_id, timestamp, body)
