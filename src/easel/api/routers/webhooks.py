"""/api/v1/webhooks: what a key needs to check the deliveries of its jobs (easel.jobs.webhooks)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from easel.api.deps import PrincipalDep, ServicesDep
from easel.api.schemas import WebhookSecret

router = APIRouter(prefix="/webhooks", tags=["webhooks"])


@router.get("/secret")
def webhook_secret(
    services: ServicesDep, principal: PrincipalDep, response: Response
) -> WebhookSecret:
    """The secret that signs the webhook deliveries of this key's jobs (each key has its
    own): verify ``Easel-Signature`` with it (see WEBHOOKS.md)."""
    response.headers["Cache-Control"] = "no-store"
    return WebhookSecret(
        secret=services.webhook_secret(principal),
        owner=principal.key_id,
        enabled=services.webhooks is not None and services.webhooks.policy.enabled,
    )
