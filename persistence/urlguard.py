"""Which URLs the service may call (webhooks): http(s) to public addresses only, against SSRF.

`check_url` parses a URL and resolves its host; every address it resolves to must be a public
one (not loopback, private, link-local, multicast, reserved, unspecified, shared or
documentation space; IPv4 inside IPv6 is unwrapped first). Cloud metadata endpoints are
refused even when the operator allows private addresses (`SVDFORGE_WEBHOOKS_ALLOW_PRIVATE`,
for receivers on a private network or tests on loopback). The API checks at registration and
the dispatcher at every delivery, then connects to the very addresses it checked (DNS can
change between the check and the connection).
"""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit

MAX_URL_LENGTH = 2000
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# AWS, GCP, Azure, OpenStack (IPv4 and AWS's IPv6), AWS ECS task metadata, Alibaba, Oracle.
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "fd00:ec2::254", "169.254.170.2", "100.100.100.200", "192.0.0.192"))
METADATA_HOSTS = frozenset({"metadata", "metadata.google.internal", "metadata.goog", "instance-data",
                            "instance-data.ec2.internal", "metadata.azure.com"})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class UnsafeURL(ValueError):
    """The URL may not be called; the message says why (shown to the user as a 422 on `url`)."""


@dataclass(frozen=True)
class Target:
    """A checked URL: where to connect (`addresses`, in resolver order) and what to ask for."""

    url: str
    scheme: str
    host: str  # as written (lower case, no brackets, no trailing dot)
    port: int
    addresses: list[str] = field(default_factory=list)  # every one checked


def _parse(url: str) -> tuple[str, str, int]:
    if len(url) > MAX_URL_LENGTH:
        raise UnsafeURL(f"is longer than {MAX_URL_LENGTH} characters")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise UnsafeURL("contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise UnsafeURL(f"is not a valid URL ({e})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UnsafeURL("must be an http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise UnsafeURL("must not carry credentials (user:password@); verify the signature instead")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise UnsafeURL("has no host")
    return scheme, host, port or (443 if scheme == "https" else 80)


def _unwrap(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one carries (mapped, NAT64, 6to4), which is what gets reached."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if ip.sixtofour is not None:
            return ip.sixtofour
    return ip


def blocked_reason(address: str, *, allow_private: bool = False) -> str | None:
    """Why this address may not be called, or None."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    inner = _unwrap(ip)
    if ip in METADATA_ADDRESSES or inner in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if allow_private:
        return None
    for kind in ("loopback", "private", "link_local", "multicast", "reserved", "unspecified"):
        if getattr(ip, f"is_{kind}") or getattr(inner, f"is_{kind}"):
            return f"a {kind.replace('_', '-')} address"
    if not (ip.is_global and inner.is_global):
        return "not a public address"
    return None


def resolve(host: str, port: int) -> list[str]:
    """The host's addresses (an IP literal is its own), without duplicates, in resolver order."""
    try:
        return [str(ipaddress.ip_address(host.split("%", 1)[0]))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise UnsafeURL(f"host {host!r} does not resolve ({e})") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def check_url(url: str, *, allow_private: bool = False) -> Target:
    """Parse and resolve `url`; raise `UnsafeURL` unless every address it reaches may be called
    (with `allow_private`, every address but the metadata endpoints may)."""
    scheme, host, port = _parse(url)
    if host in METADATA_HOSTS:
        raise UnsafeURL(f"host {host!r} is a cloud metadata endpoint")
    addresses = resolve(host, port)
    for address in addresses:
        if reason := blocked_reason(address, allow_private=allow_private):
            shown = host if address == host else f"{host} ({address})"
            raise UnsafeURL(f"host {shown} is {reason}; only public addresses are called")
    return Target(url, scheme, host, port, addresses)
