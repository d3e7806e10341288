"""Fetching objects that the data names (image references), inside a fence the job spec sets.

A URI in a record is chosen by whoever wrote the data, and it is read with the
pipeline's credentials. So a reference is read only when it lies under one of
the allowed prefixes, never through chained fsspec URLs or path segments that
climb out, never from a link-local address (the cloud metadata service) unless
that is allowed, never following an HTTP redirect, and never past the size cap.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from pipelines.config.job import ImageFetchSpec, default_image_prefix
from pipelines.config.storage import StorageOptions
from pipelines.io.storage import filesystem_for

HTTP_TIMEOUT_S = 30


class FetchRefused(ValueError):
    """A reference outside the fence, or an object past the cap; the message says which."""


@dataclass(frozen=True)
class FetchPolicy:
    """The resolved fence: allowed prefixes (normalised), the byte cap, and link-local access."""

    allow: tuple[str, ...]
    max_bytes: int
    allow_link_local: bool = False

    @classmethod
    def for_input(cls, spec: ImageFetchSpec, input_path: str) -> "FetchPolicy":
        prefixes = spec.allow if spec.allow is not None else [default_image_prefix(input_path)]
        return cls(allow=tuple(_normalise(p) for p in prefixes), max_bytes=spec.max_bytes,
                   allow_link_local=spec.allow_link_local)


def shown(uri: str) -> str:
    """`uri` as messages may repeat it: a user or password in it is masked."""
    if "://" not in uri:
        return uri
    scheme, rest = uri.split("://", 1)
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = "<masked>@" + authority.rsplit("@", 1)[1]
    return f"{scheme}://{authority}{slash}{path}"


def _normalise(uri: str) -> str:
    """The form references and prefixes are compared in: scheme lower-cased, local paths absolute and resolved.

    Raises FetchRefused for what no prefix may allow.
    """
    if "::" in uri:
        raise FetchRefused("chained fsspec URLs (`a::b`) are not fetched")
    if "://" not in uri or uri.lower().startswith("file://"):
        path = uri[len("file://"):] if "://" in uri else uri
        if not os.path.isabs(path):
            raise FetchRefused("a relative local path is not fetched")
        # realpath follows `..` and symbolic links, so neither can lead out of an allowed folder.
        return os.path.realpath(path)
    scheme, rest = uri.split("://", 1)
    scheme = scheme.lower()
    if scheme in ("http", "https"):
        parts = urlsplit(f"{scheme}://{rest}")
        if parts.username is not None or parts.password is not None:
            raise FetchRefused("a URI with a user or password is not fetched")
        host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
        rest = host + parts.path + (f"?{parts.query}" if parts.query else "")
    if any(segment in (".", "..") for segment in unquote(rest).split("/")[1:]):
        raise FetchRefused("a path with `.` or `..` segments is not fetched")
    return f"{scheme}://{rest}"


def _within(uri: str, prefix: str) -> bool:
    root = prefix.rstrip("/")
    return uri == root or uri.startswith(root + "/")


def _link_local(host: str) -> bool:
    """Whether `host` is or resolves to a link-local address (an unresolvable host is not)."""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if address.is_link_local:
            return True
    return False


def check(uri: str, policy: FetchPolicy) -> str:
    """The normalised reference when `policy` lets it be fetched; raises FetchRefused saying why not."""
    normal = _normalise(uri)
    if not any(_within(normal, prefix) for prefix in policy.allow):
        raise FetchRefused(f"outside the allowed locations ({', '.join(policy.allow)}; prompt.images.allow)")
    scheme = normal.split("://", 1)[0] if "://" in normal else "file"
    if scheme in ("http", "https") and not policy.allow_link_local:
        host = urlsplit(normal).hostname or ""
        if _link_local(host):
            raise FetchRefused(f"{host} is a link-local address (prompt.images.allow_link_local)")
    return normal


def fetch(uri: str, storage: StorageOptions, policy: FetchPolicy) -> bytes:
    """The object `uri` names, once `check` allows it, read no further than the cap.

    Raises FetchRefused (fence or cap), FileNotFoundError, or the store's own error.
    """
    normal = check(uri, policy)
    if normal.startswith(("http://", "https://")):
        return _fetch_http(normal, policy.max_bytes)
    fs, path = filesystem_for(normal, storage)
    with fs.open(path, "rb") as f:
        data = f.read(policy.max_bytes + 1)
    return _capped(data, policy.max_bytes)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    # An allowed host could otherwise send the fetch anywhere, the metadata service included.
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise FetchRefused(f"HTTP {code} redirect to {newurl}: redirects are not followed")


def _fetch_http(url: str, max_bytes: int) -> bytes:
    opener = urllib.request.build_opener(_NoRedirects)
    try:
        with opener.open(url, timeout=HTTP_TIMEOUT_S) as response:
            return _capped(response.read(max_bytes + 1), max_bytes)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise FileNotFoundError(url) from None
        raise OSError(f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise OSError(str(exc.reason)) from None


def _capped(data: bytes, max_bytes: int) -> bytes:
    if len(data) > max_bytes:
        raise FetchRefused(f"larger than {max_bytes} bytes (prompt.images.max_bytes)")
    return data
