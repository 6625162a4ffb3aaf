from http import HTTPStatus
from typing import Any
from urllib.parse import quote

import httpx

from ... import errors
from ...client import AuthenticatedClient, Client
from ...models.job_event_list import JobEventList
from ...models.problem import Problem
from ...types import UNSET, Response, Unset


def _get_kwargs(
    job_id: str,
    *,
    after: None | str | Unset = UNSET,
    limit: int | Unset = 100,
    last_event_id: None | str | Unset = UNSET,
) -> dict[str, Any]:
    headers: dict[str, Any] = {}
    if not isinstance(last_event_id, Unset):
        headers["Last-Event-ID"] = last_event_id

    params: dict[str, Any] = {}

    json_after: None | str | Unset
    if isinstance(after, Unset):
        json_after = UNSET
    else:
        json_after = after
    params["after"] = json_after

    params["limit"] = limit

    params = {k: v for k, v in params.items() if v is not UNSET and v is not None}

    _kwargs: dict[str, Any] = {
        "method": "get",
        "url": "/v1/jobs/{job_id}/events".format(
            job_id=quote(str(job_id), safe=""),
        ),
        "params": params,
    }

    _kwargs["headers"] = headers
    return _kwargs


def _parse_response(*, client: AuthenticatedClient | Client, response: httpx.Response) -> JobEventList | Problem | None:
    if response.status_code == 200:
        response_200 = JobEventList.from_dict(response.json())

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
) -> Response[JobEventList | Problem]:
    return Response(
        status_code=HTTPStatus(response.status_code),
        content=response.content,
        headers=response.headers,
        parsed=_parse_response(client=client, response=response),
    )


def sync_detailed(
    job_id: str,
    *,
    client: AuthenticatedClient,
    after: None | str | Unset = UNSET,
    limit: int | Unset = 100,
    last_event_id: None | str | Unset = UNSET,
) -> Response[JobEventList | Problem]:
    """List a job's events, oldest first, or follow them live (Server-Sent Events)

     An append-only log: status changes, stage started/finished, progress, metrics, errors. Follow a job
    by passing the last id you saw as `after`. With `Accept: text/event-stream`: the same events as
    Server-Sent Events, live. Each message has `id: evt_<n>`, `event: <type>` and `data: <the event
    object as JSON>`; comment lines keep the connection alive. The stream ends after the job's final
    status event (succeeded, failed, cancelled). Resume after a disconnect with the `Last-Event-ID`
    header (or `after`).

    Args:
        job_id (str):
        after (None | str | Unset): Cursor: the last id of the previous page.
        limit (int | Unset):  Default: 100.
        last_event_id (None | str | Unset): With `Accept: text/event-stream`: resume after this
            event id (what an EventSource sends when it reconnects); it takes precedence over `after`.

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        Response[JobEventList | Problem]
    """

    kwargs = _get_kwargs(
        job_id=job_id,
        after=after,
        limit=limit,
        last_event_id=last_event_id,
    )

    response = client.get_httpx_client().request(
        **kwargs,
    )

    return _build_response(client=client, response=response)


def sync(
    job_id: str,
    *,
    client: AuthenticatedClient,
    after: None | str | Unset = UNSET,
    limit: int | Unset = 100,
    last_event_id: None | str | Unset = UNSET,
) -> JobEventList | Problem | None:
    """List a job's events, oldest first, or follow them live (Server-Sent Events)

     An append-only log: status changes, stage started/finished, progress, metrics, errors. Follow a job
    by passing the last id you saw as `after`. With `Accept: text/event-stream`: the same events as
    Server-Sent Events, live. Each message has `id: evt_<n>`, `event: <type>` and `data: <the event
    object as JSON>`; comment lines keep the connection alive. The stream ends after the job's final
    status event (succeeded, failed, cancelled). Resume after a disconnect with the `Last-Event-ID`
    header (or `after`).

    Args:
        job_id (str):
        after (None | str | Unset): Cursor: the last id of the previous page.
        limit (int | Unset):  Default: 100.
        last_event_id (None | str | Unset): With `Accept: text/event-stream`: resume after this
            event id (what an EventSource sends when it reconnects); it takes precedence over `after`.

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        JobEventList | Problem
    """

    return sync_detailed(
        job_id=job_id,
        client=client,
        after=after,
        limit=limit,
        last_event_id=last_event_id,
    ).parsed


async def asyncio_detailed(
    job_id: str,
    *,
    client: AuthenticatedClient,
    after: None | str | Unset = UNSET,
    limit: int | Unset = 100,
    last_event_id: None | str | Unset = UNSET,
) -> Response[JobEventList | Problem]:
    """List a job's events, oldest first, or follow them live (Server-Sent Events)

     An append-only log: status changes, stage started/finished, progress, metrics, errors. Follow a job
    by passing the last id you saw as `after`. With `Accept: text/event-stream`: the same events as
    Server-Sent Events, live. Each message has `id: evt_<n>`, `event: <type>` and `data: <the event
    object as JSON>`; comment lines keep the connection alive. The stream ends after the job's final
    status event (succeeded, failed, cancelled). Resume after a disconnect with the `Last-Event-ID`
    header (or `after`).

    Args:
        job_id (str):
        after (None | str | Unset): Cursor: the last id of the previous page.
        limit (int | Unset):  Default: 100.
        last_event_id (None | str | Unset): With `Accept: text/event-stream`: resume after this
            event id (what an EventSource sends when it reconnects); it takes precedence over `after`.

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        Response[JobEventList | Problem]
    """

    kwargs = _get_kwargs(
        job_id=job_id,
        after=after,
        limit=limit,
        last_event_id=last_event_id,
    )

    response = await client.get_async_httpx_client().request(**kwargs)

    return _build_response(client=client, response=response)


async def asyncio(
    job_id: str,
    *,
    client: AuthenticatedClient,
    after: None | str | Unset = UNSET,
    limit: int | Unset = 100,
    last_event_id: None | str | Unset = UNSET,
) -> JobEventList | Problem | None:
    """List a job's events, oldest first, or follow them live (Server-Sent Events)

     An append-only log: status changes, stage started/finished, progress, metrics, errors. Follow a job
    by passing the last id you saw as `after`. With `Accept: text/event-stream`: the same events as
    Server-Sent Events, live. Each message has `id: evt_<n>`, `event: <type>` and `data: <the event
    object as JSON>`; comment lines keep the connection alive. The stream ends after the job's final
    status event (succeeded, failed, cancelled). Resume after a disconnect with the `Last-Event-ID`
    header (or `after`).

    Args:
        job_id (str):
        after (None | str | Unset): Cursor: the last id of the previous page.
        limit (int | Unset):  Default: 100.
        last_event_id (None | str | Unset): With `Accept: text/event-stream`: resume after this
            event id (what an EventSource sends when it reconnects); it takes precedence over `after`.

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        JobEventList | Problem
    """

    return (
        await asyncio_detailed(
            job_id=job_id,
            client=client,
            after=after,
            limit=limit,
            last_event_id=last_event_id,
        )
    ).parsed
