"""Database URLs as the stores show them: for PostgreSQL who, where and which database, never
a password; for SQLite the file."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMES = ("postgresql://", "postgres://")
SQLITE_SCHEME = "sqlite:///"  # then the path: sqlite:///relative.db, sqlite:////absolute.db


def _conninfo(url: str) -> dict[str, Any]:
    """libpq's reading of ``url``, or ValueError. The driver loads here, not on import:
    checking a configuration must not load psycopg (and the asyncio it imports)."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        return conninfo_to_dict(url)
    except psycopg.Error as e:
        raise ValueError(str(e)) from e


def is_database_url(where: object) -> bool:
    return isinstance(where, str) and where.startswith(SCHEMES)


def is_sqlite_url(where: object) -> bool:
    return isinstance(where, str) and where.startswith(SQLITE_SCHEME)


def sqlite_path(url: str) -> Path:
    """The file a ``sqlite:///PATH`` URL names, as written (relative to the working directory
    if relative: ``resolve_sqlite_url`` puts it beside the configuration); ValueError if
    it names none."""
    if not is_sqlite_url(url):
        raise ValueError("expected sqlite:///PATH (three slashes, then the file's path)")
    path = url[len(SQLITE_SCHEME) :]
    if not path or path.endswith("/") or "\0" in path:
        raise ValueError(f"{url!r} names no file: expected sqlite:///PATH")
    return Path(path)


def resolve_sqlite_url(url: str, base: Path) -> str:
    """``url`` with a relative SQLite path made absolute from ``base`` (the configuration
    file's directory); any other URL as it is."""
    if not is_sqlite_url(url):
        return url
    return f"{SQLITE_SCHEME}{(base / sqlite_path(url)).absolute()}"


def describe(url: str) -> str:
    """``postgresql://USER@HOST:PORT/DB`` for messages and logs: never the password."""
    try:
        parts = _conninfo(url)
    except ValueError:
        try:
            split = urllib.parse.urlsplit(url)
        except ValueError:
            return "postgresql://(an invalid URL)"
        user, _, hostport = split.netloc.rpartition("@")
        user = user.partition(":")[0]
        return f"postgresql://{user + '@' if user else ''}{hostport}{split.path}"
    user = f"{parts['user']}@" if parts.get("user") else ""
    hosts = str(parts.get("host") or "localhost").split(",")
    ports = str(parts.get("port") or "5432").split(",")
    if len(ports) == 1:
        ports *= len(hosts)  # one port for every host
    where = ",".join(f"{h}:{p or 5432}" for h, p in zip(hosts, ports, strict=False))
    return f"postgresql://{user}{where}/{parts.get('dbname') or ''}"


def transport_problem(url: str) -> str | None:
    """Why a URL does not protect what crosses to its database, or None. The registry's
    grants and the ledger's records are only as sound as the connection: a database on
    another host must be reached over TLS that verifies its name (``sslmode=verify-full``);
    libpq's default (``prefer``) lets whoever sits between fall back to plain text."""
    try:
        parts = _conninfo(url)
    except ValueError as e:
        return f"not a PostgreSQL URL: {Database(url).why(e)}"  # the driver quotes the URL
    if parts.get("service") or os.environ.get("PGSERVICE"):
        return "a service name leaves the host to a file Tabadol does not read: name the host"
    # Where libpq goes: each host's address if given, else its name; what the URL leaves
    # out, libpq takes from its environment.
    hosts = _entries(parts.get("host") or os.environ.get("PGHOST"))
    addresses = _entries(parts.get("hostaddr") or os.environ.get("PGHOSTADDR"))
    targets = [
        (addresses[i] if i < len(addresses) else "") or (hosts[i] if i < len(hosts) else "")
        for i in range(max(len(hosts), len(addresses)))
    ]  # an empty one: libpq's Unix socket
    remote = [target for target in targets if target and not _local(target)]
    if remote and parts.get("sslmode") != "verify-full":
        return (
            f"{', '.join(remote)} is another host: reach it with sslmode=verify-full (and "
            "sslrootcert=FILE, the database server's CA), so that no one between can read or "
            "change what crosses; only loopback addresses and Unix sockets may go without"
        )
    return None


def _entries(value: object) -> list[str]:
    return str(value).split(",") if value else []


def _local(host: str) -> bool:
    if host.startswith("/") or host == "localhost":
        return True  # a Unix socket directory, or this machine
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _secrets(url: str) -> list[str]:
    """The password in ``url``, as written and decoded: psycopg may quote either. Read by
    hand: a URL too broken for a parser may still hold one."""
    rest = url.partition("://")[2]
    netloc, _, tail = rest.partition("/")
    userinfo = netloc.rpartition("@")[0]
    found = {userinfo.partition(":")[2]} if ":" in userinfo else set()
    found.update(re.findall(r"(?:^|[?&])password=([^&]*)", tail.partition("?")[2]))
    with contextlib.suppress(ValueError):
        found.add(str(_conninfo(url).get("password") or ""))
    found |= {urllib.parse.unquote(s) for s in found}
    return sorted((s for s in found if s), key=len, reverse=True)


@dataclass(frozen=True)
class Database:
    """A database URL and what may be said of it."""

    url: str

    @property
    def where(self) -> str:
        return describe(self.url)

    def scrub(self, text: str) -> str:
        """``text`` with the URL's password cut out, should the driver ever quote it."""
        for secret in _secrets(self.url):
            text = text.replace(secret, "***")
        return text

    def why(self, error: BaseException) -> str:
        """The driver's reason, its first line, without the password."""
        text = str(error).strip()
        return self.scrub(text.splitlines()[0] if text else type(error).__name__)
