"""/v1/webhooks: register endpoints for your jobs' events, list, get, delete, and see deliveries.

A webhook receives the events of the jobs of the key that registered it; the secret that
signs its deliveries is in the create response only. Deliveries are written by the job's
state machine (`persistence.webhooks`) and sent by the workers (`worker.webhooks`).
"""
from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from svdforge.api.deps import CurrentKey, SessionDep, SettingsDep
from svdforge.api.json_body import JsonRoute
from svdforge.api.problems import ProblemError, field_error
from svdforge.api.routes.common import After, Limit, cursor, list_response, page, problems
from svdforge.api.schemas import (
    WebhookCreate,
    WebhookCreated,
    WebhookDeleted,
    WebhookDeliveryList,
    WebhookDeliveryOut,
    WebhookList,
    WebhookOut,
)
from svdforge.persistence.ids import new_id
from svdforge.persistence.tables import ApiKey, Webhook, WebhookDelivery, utcnow
from svdforge.persistence.urlguard import UnsafeURL, check_url
from svdforge.persistence.webhooks import new_secret

router = APIRouter(prefix="/webhooks", tags=["webhooks"], route_class=JsonRoute)


def webhook_out(h: Webhook) -> WebhookOut:
    return WebhookOut(id=h.id, url=h.url, events=h.events, description=h.description or "", created_at=h.created_at)


def delivery_out(d: WebhookDelivery) -> WebhookDeliveryOut:
    return WebhookDeliveryOut(id=d.id, webhook_id=d.webhook_id, job_id=d.job_id, type=d.type, status=d.status,
                              attempts=d.attempts, next_attempt_at=d.next_attempt_at,
                              last_attempt_at=d.last_attempt_at, last_status_code=d.last_status_code,
                              last_error=d.last_error, delivered_at=d.delivered_at, created_at=d.created_at,
                              history=d.history or [])


def _owned(session: Session, webhook_id: str, key: ApiKey) -> Webhook:
    h = session.get(Webhook, webhook_id)
    if h is None or h.owner_id != key.id:
        raise ProblemError(404, "not_found", f"no webhook {webhook_id}")
    return h


@router.post("", status_code=201, operation_id="create_webhook", response_model=WebhookCreated,
             responses={201: {"headers": {"Location": {"description": "URL of the webhook.",
                                                       "schema": {"type": "string"}}}},
                        **problems(400, 401, 409, 413, 415, 422)},
             summary="Register a webhook for your jobs' events",
             description="The response holds the signing secret (`whsec_...`), shown this once. URLs whose host "
                         "resolves to a loopback, private, link-local, multicast, reserved or metadata address "
                         "are refused (422 on `url`), unless the operator allows private addresses.")
def create_webhook(body: WebhookCreate, request: Request, response: Response, session: SessionDep,
                   key: CurrentKey, settings: SettingsDep) -> WebhookCreated:
    try:
        check_url(body.url, allow_private=settings.webhooks_allow_private)
    except UnsafeURL as e:
        raise field_error("url", str(e), "unsafe_url") from None
    count = session.scalar(select(func.count()).select_from(Webhook).where(Webhook.owner_id == key.id))
    if count >= settings.webhooks_max_per_key:
        raise ProblemError(409, "too_many_webhooks", f"this key has {count} webhooks, the most allowed; "
                           "delete one first", limit=settings.webhooks_max_per_key)
    h = Webhook(id=new_id("whk"), owner_id=key.id, url=body.url, events=body.events, description=body.description,
                secret=new_secret(), created_at=utcnow())
    session.add(h)
    session.commit()
    response.headers["Location"] = str(request.url_for("get_webhook", webhook_id=h.id))
    return WebhookCreated(**webhook_out(h).model_dump(), secret=h.secret)


@router.get("", operation_id="list_webhooks", response_model=WebhookList, responses=problems(401, 422),
            summary="List your webhooks, newest first (without their secrets)")
def list_webhooks(session: SessionDep, key: CurrentKey, after: After = None, limit: Limit = 20) -> WebhookList:
    q = select(Webhook).where(Webhook.owner_id == key.id)
    if cursor(after, "whk"):
        q = q.where(Webhook.id < after)
    rows, more = page(list(session.scalars(q.order_by(Webhook.id.desc()).limit(limit + 1))), limit)
    return list_response(WebhookList, [webhook_out(h) for h in rows], more)


@router.get("/{webhook_id}", operation_id="get_webhook", response_model=WebhookOut,
            responses=problems(401, 404, 422), summary="Get a webhook (without its secret)")
def get_webhook(webhook_id: str, session: SessionDep, key: CurrentKey) -> WebhookOut:
    return webhook_out(_owned(session, webhook_id, key))


@router.delete("/{webhook_id}", operation_id="delete_webhook", response_model=WebhookDeleted,
               responses=problems(401, 404, 422), summary="Delete a webhook and its pending deliveries")
def delete_webhook(webhook_id: str, session: SessionDep, key: CurrentKey) -> WebhookDeleted:
    h = _owned(session, webhook_id, key)
    session.execute(delete(WebhookDelivery).where(WebhookDelivery.webhook_id == h.id))
    session.delete(h)
    session.commit()
    return WebhookDeleted(id=webhook_id)


@router.get("/{webhook_id}/deliveries", operation_id="list_webhook_deliveries", response_model=WebhookDeliveryList,
            responses=problems(401, 404, 422), summary="List a webhook's deliveries, newest first",
            description="Each delivery is one event: its status, attempts (each with its response code or error) "
                        "and, while pending, when the next attempt is due.")
def list_webhook_deliveries(
        webhook_id: str, session: SessionDep, key: CurrentKey, after: After = None, limit: Limit = 20,
        status: Annotated[Literal["pending", "succeeded", "failed"] | None,
                          Query(description="Only deliveries in this status.")] = None) -> WebhookDeliveryList:
    _owned(session, webhook_id, key)
    q = select(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook_id)
    if status is not None:
        q = q.where(WebhookDelivery.status == status)
    if cursor(after, "msg"):
        q = q.where(WebhookDelivery.id < after)
    rows, more = page(list(session.scalars(q.order_by(WebhookDelivery.id.desc()).limit(limit + 1))), limit)
    return list_response(WebhookDeliveryList, [delivery_out(d) for d in rows], more)
