"""Helpers for the event-stream tests: a uvicorn server in a thread, and an SSE reader."""
from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import uvicorn


@dataclass
class Message:
    id: str | None = None
    event: str | None = None
    data: list[str] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)

    @property
    def json(self) -> dict:
        return json.loads("\n".join(self.data))


def messages(lines: Iterator[str]) -> Iterator[Message]:
    """The text/event-stream grammar (WHATWG HTML 9.2.6), as far as this API uses it.

    A message made only of comment lines (the keep-alive) is yielded too, with no event.
    """
    msg = Message()
    for line in lines:
        if line == "":
            if msg.data or msg.comments or msg.id is not None:
                yield msg
            msg = Message()
            continue
        if line.startswith(":"):
            msg.comments.append(line[1:].strip())
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "id":
            msg.id = value
        elif name == "event":
            msg.event = value
        elif name == "data":
            msg.data.append(value)
    if msg.data or msg.id is not None:
        yield msg


def events_of(response: httpx.Response) -> list[Message]:
    """Every event message until the server closes the stream (keep-alives left out)."""
    return [m for m in messages(response.iter_lines()) if m.event is not None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(app) -> Iterator[str]:
    """The app behind a real uvicorn on loopback (streams, disconnects), in a thread of this process."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
