from http import HTTPStatus
from typing import Any
from urllib.parse import quote

import httpx

from ... import errors
from ...client import AuthenticatedClient, Client
from ...models.list_webhook_deliveries_status_type_0 import ListWebhookDeliveriesStatusType0
from ...models.problem import Problem
from ...models.webhook_delivery_list import WebhookDeliveryList
from ...types import UNSET, Response, Unset


def _get_kwargs(
    webhook_id: str,
    *,
    after: None | str | Unset = UNSET,
    limit: int | Unset = 20,
    status: ListWebhookDeliveriesStatusType0 | None | Unset = UNSET,
) -> dict[str, Any]:

    params: dict[str, Any] = {}

    json_after: None | str | Unset
    if isinstance(after, Unset):
        json_after = UNSET
    else:
        json_after = after
    params["after"] = json_after

    params["limit"] = limit

    json_status: None | str | Unset
    if isinstance(status, Unset):
        json_status = UNSET
    elif isinstance(status, ListWebhookDeliveriesStatusType0):
        json_status = status.value
    else:
        json_status = status
    params["status"] = json_status

    params = {k: v for k, v in params.items() if v is not UNSET and v is not None}

    _kwargs: dict[str, Any] = {
        "method": "get",
        "url": "/v1/webhooks/{webhook_id}/deliveries".format(
            webhook_id=quote(str(webhook_id), safe=""),
        ),
        "params": params,
    }

    return _kwargs


def _parse_response(
    *, client: AuthenticatedClient | Client, response: httpx.Response
) -> Problem | WebhookDeliveryList | None:
    if response.status_code == 200:
        response_200 = WebhookDeliveryList.from_dict(response.json())

        return response_200

    if response.status_code == 401:
        response_401 = Problem.from_dict(response.json())

        return response_401

    if response.status_code == 404:
        response_404 = Problem.from_dict(response.json())

        return response_404

    if response.status_code == 422:
        response_422 = Problem.from_dict(response.json())

        return response_422

    if client.raise_on_unexpected_status:
        raise errors.UnexpectedStatus(response.status_code, response.content)
    else:
        return None


def _build_response(
    *, client: AuthenticatedClient | Client, response: httpx.Response
) -> Response[Problem | WebhookDeliveryList]:
    return Response(
        status_code=HTTPStatus(response.status_code),
        content=response.content,
        headers=response.headers,
        parsed=_parse_response(client=client, response=response),
    )


def sync_detailed(
    webhook_id: str,
    *,
    client: AuthenticatedClient,
    after: None | str | Unset = UNSET,
    limit: int | Unset = 20,
    status: ListWebhookDeliveriesStatusType0 | None | Unset = UNSET,
) -> Response[Problem | WebhookDeliveryList]:
    """List a webhook's deliveries, newest first

     Each delivery is one event: its status, attempts (each with its response code or error) and, while
    pending, when the next attempt is due.

    Args:
        webhook_id (str):
        after (None | str | Unset): Cursor: the last id of the previous page.
        limit (int | Unset): Page size. Default: 20.
        status (ListWebhookDeliveriesStatusType0 | None | Unset): Only deliveries in this status.

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        Response[Problem | WebhookDeliveryList]
    """

    kwargs = _get_kwargs(
        webhook_id=webhook_id,
        after=after,
        limit=limit,
        status=status,
    )

    response = client.get_httpx_client().request(
        **kwargs,
    )

    return _build_response(client=client, response=response)


def sync(
    webhook_id: str,
    *,
    client: AuthenticatedClient,
    after: None | str | Unset = UNSET,
    limit: int | Unset = 20,
    status: ListWebhookDeliveriesStatusType0 | None | Unset = UNSET,
) -> Problem | WebhookDeliveryList | None:
    """List a webhook's deliveries, newest first

     Each delivery is one event: its status, attempts (each with its response code or error) and, while
    pending, when the next attempt is due.

    Args:
        webhook_id (str):
        after (None | str | Unset): Cursor: the last id of the previous page.
        limit (int | Unset): Page size. Default: 20.
        status (ListWebhookDeliveriesStatusType0 | None | Unset): Only deliveries in this status.

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        Problem | WebhookDeliveryList
    """

    return sync_detailed(
        webhook_id=webhook_id,
        client=client,
        after=after,
        limit=limit,
        status=status,
    ).parsed


async def asyncio_detailed(
    webhook_id: str,
    *,
    client: AuthenticatedClient,
    after: None | str | Unset = UNSET,
    limit: int | Unset = 20,
    status: ListWebhookDeliveriesStatusType0 | None | Unset = UNSET,
) -> Response[Problem | WebhookDeliveryList]:
    """List a webhook's deliveries, newest first

     Each delivery is one event: its status, attempts (each with its response code or error) and, while
    pending, when the next attempt is due.

    Args:
        webhook_id (str):
        after (None | str | Unset): Cursor: the last id of the previous page.
        limit (int | Unset): Page size. Default: 20.
        status (ListWebhookDeliveriesStatusType0 | None | Unset): Only deliveries in this status.

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        Response[Problem | WebhookDeliveryList]
    """

    kwargs = _get_kwargs(
        webhook_id=webhook_id,
        after=after,
        limit=limit,
        status=status,
    )

    response = await client.get_async_httpx_client().request(**kwargs)

    return _build_response(client=client, response=response)


async def asyncio(
    webhook_id: str,
    *,
    client: AuthenticatedClient,
    after: None | str | Unset = UNSET,
    limit: int | Unset = 20,
    status: ListWebhookDeliveriesStatusType0 | None | Unset = UNSET,
) -> Problem | WebhookDeliveryList | None:
    """List a webhook's deliveries, newest first

     Each delivery is one event: its status, attempts (each with its response code or error) and, while
    pending, when the next attempt is due.

    Args:
        webhook_id (str):
        after (None | str | Unset): Cursor: the last id of the previous page.
        limit (int | Unset): Page size. Default: 20.
        status (ListWebhookDeliveriesStatusType0 | None | Unset): Only deliveries in this status.

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        Problem | WebhookDeliveryList
    """

    return (
        await asyncio_detailed(
            webhook_id=webhook_id,
            client=client,
            after=after,
            limit=limit,
            status=status,
        )
    ).parsed
