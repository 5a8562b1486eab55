"""``https://`` image inputs on HTTP calls, for the hosts of ``--fetch-hosts`` only.

A server that fetches whatever URL a caller names lets that caller reach what only the server
can (cloud metadata endpoints, internal services): server-side request forgery. So:

- off unless hosts are listed; only ``https``; the URL's host must be listed exactly;
- a listed *name* must resolve to public addresses only (checked in the resolver the connection
  itself uses, so a name cannot resolve publicly for a check and privately for the connection);
  a private/loopback address is reached only when it is itself listed as an IP address;
- redirects are followed (at most 3) only to the same host over https;
- at most ``--fetch-max-mb`` per image and ``--fetch-timeout-s`` per fetch.

Every refusal is an :class:`InvalidRequest` naming the input's index (HTTP 400).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import ssl
from collections.abc import Sequence
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.resolver import ThreadedResolver

from simclr_embed.server.core import InvalidRequest

MAX_REDIRECTS = 3


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    return ip.is_global and not ip.is_multicast


class NonPublicAddress(OSError):
    """A listed host name resolved to a private, loopback or otherwise non-public address."""


class _PublicOnlyResolver(ThreadedResolver):
    """Resolves like the default resolver, but refuses a name with any non-public address."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[dict[str, Any]]:
        infos = await super().resolve(host, port, family)
        for info in infos:
            if not is_public(info["host"]):
                raise NonPublicAddress(
                    errno.EACCES, f"{host} resolves to a non-public address ({info['host']})"
                )
        return infos


class Fetcher:
    """Fetches allowed image URLs; one connection pool for the server's life."""

    def __init__(self, hosts: Sequence[str], max_bytes: int, timeout_s: float) -> None:
        self.hosts = frozenset(h.lower().strip("[]") for h in hosts)
        self.max_bytes = max_bytes
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            # The system's CA store (SSL_CERT_FILE / SSL_CERT_DIR are honoured).
            context = ssl.create_default_context()
            connector = aiohttp.TCPConnector(resolver=_PublicOnlyResolver(), ssl=context)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self.timeout, trust_env=False
            )
        return self._session

    def check(self, url: str, index: int) -> str:
        """The URL's host if it may be fetched, else :class:`InvalidRequest`."""
        if not self.hosts:
            raise InvalidRequest(
                f"image {index}: image URLs are not fetched by this server (start it with "
                "--fetch-hosts HOST to allow a host); send the image bytes as base64",
                index,
            )
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if parts.scheme != "https":
            raise InvalidRequest(f"image {index}: only https:// URLs are fetched", index)
        if host not in self.hosts:
            raise InvalidRequest(f"image {index}: host {host!r} is not in --fetch-hosts", index)
        try:
            listed_ip = ipaddress.ip_address(host)
        except ValueError:
            listed_ip = None
        if listed_ip is not None and listed_ip.is_unspecified:
            raise InvalidRequest(f"image {index}: address {host} is not fetched", index)
        return host

    async def fetch(self, url: str, index: int) -> bytes:
        host = self.check(url, index)
        session = self._open()
        try:
            for _ in range(MAX_REDIRECTS + 1):
                async with session.get(url, allow_redirects=False) as response:
                    if response.status in (301, 302, 303, 307, 308):
                        target = urljoin(url, response.headers.get("Location", ""))
                        parts = urlsplit(target)
                        if parts.scheme != "https" or (parts.hostname or "").lower() != host:
                            raise InvalidRequest(
                                f"image {index}: {url} redirects to another host or scheme "
                                f"({parts.scheme}://{parts.hostname}); not followed",
                                index,
                            )
                        url = target
                        continue
                    if response.status != 200:
                        raise InvalidRequest(
                            f"image {index}: fetching {url} answered HTTP {response.status}",
                            index,
                        )
                    return await self._read(response, url, index)
            raise InvalidRequest(f"image {index}: more than {MAX_REDIRECTS} redirects", index)
        except InvalidRequest:
            raise
        except asyncio.TimeoutError:
            raise InvalidRequest(
                f"image {index}: fetching {url} took longer than "
                f"{self.timeout.total:g} s (--fetch-timeout-s)",
                index,
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            cause = getattr(exc, "os_error", exc)
            if isinstance(cause, NonPublicAddress):
                raise InvalidRequest(
                    f"image {index}: {cause.strerror}; not fetched", index
                ) from None
            raise InvalidRequest(f"image {index}: cannot fetch {url}: {exc}", index) from None

    async def _read(self, response: aiohttp.ClientResponse, url: str, index: int) -> bytes:
        too_big = InvalidRequest(
            f"image {index}: {url} is larger than {self.max_bytes} bytes (--fetch-max-mb)", index
        )
        if (response.content_length or 0) > self.max_bytes:
            raise too_big
        chunks, size = [], 0
        async for chunk in response.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > self.max_bytes:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
