"""``tabadol registry``: import, export, diff, history and verify of the registry database,
and publishing the exchange's CRL into it."""

from __future__ import annotations

import argparse
import getpass
import os
import socket
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tabadol import config as config_module
from tabadol.config import BrokerConfig
from tabadol.errors import ConfigError
from tabadol.registry.audit import TrailCheck
from tabadol.registry.entries import Entries, diff, digest, entries_data, summary, to_toml
from tabadol.registry.store import Registry, RegistryRefused, open_registry
from tabadol.registry.store.base import number_refused

MAX_REGISTRY_FILE_BYTES = 16 * 1024 * 1024
_HISTORY_PAGE = 100  # versions read at a time: their entries are needed only for the diff


def default_by() -> str:
    """Who is changing the registry, when --by does not say: ``user@host``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _registry_config(path: Path) -> tuple[BrokerConfig, str]:
    cfg = config_module.load(path)
    if cfg.registry.url is None:
        raise ConfigError(
            f"{cfg.path}: [registry] url is not set: this broker's registry is the entries in "
            'the file itself (set url = "sqlite:///registry.db" for a database on this node, '
            'or url = "postgresql://..." for one every node shares: docs/registry.md)'
        )
    return cfg, cfg.registry.url


@contextmanager
def _opened(url: str) -> Iterator[Registry]:
    store = open_registry(url)
    try:
        yield store
    finally:
        store.close()


def _bounded(path: Path) -> None:
    """Refuse what is not a regular file of at most MAX_REGISTRY_FILE_BYTES, before reading."""
    try:
        info = os.stat(path)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the registry file: {e.strerror}") from e
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{path}: not a regular file: a registry file is read whole")
    if info.st_size > MAX_REGISTRY_FILE_BYTES:
        raise ConfigError(
            f"{path}: {info.st_size} bytes, more than a registry file may hold "
            f"({MAX_REGISTRY_FILE_BYTES // (1024 * 1024)} MiB)"
        )


def _checked_file(cfg: BrokerConfig, path: Path) -> Entries:
    """A registry file's entries, validated exactly as the broker validates its own file."""
    _bounded(path)
    entries = config_module.read_registry_file(path)
    config_module.apply_entries(cfg, entries, path.resolve())
    return entries_data(entries)


def _cmd_import(args: argparse.Namespace) -> int:
    cfg, url = _registry_config(args.config)
    data = _checked_file(cfg, args.file)  # a bad file is refused whole, before any change
    new_digest = digest(data)
    with _opened(url) as store:
        current = store.current()
        refused = number_refused(
            store.where, args.skip_to, current.number if current is not None else 0
        )
        if refused is not None:  # before the diff: a typo is said at once
            raise RegistryRefused(refused)
        if args.skip_to is None and current is not None and current.digest == new_digest:
            print(f"{store.where}: unchanged: version {current.number} already holds these entries")
            return 0
        changes = diff(current.entries if current is not None else {}, data)
        version = store.commit(
            data, args.by or default_by(), args.reason, new_digest, number=args.skip_to
        )
    print(
        f"{store.where}: committed registry version {version.number} "
        f"({summary(changes)}); every broker node applies it within seconds"
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    _, url = _registry_config(args.config)
    with _opened(url) as store:
        current = store.current()
    if current is None:
        raise ConfigError(
            f"{store.where}: the registry has no version yet: import one with "
            f"`tabadol registry import --config {args.config} FILE`"
        )
    header = (
        f"Tabadol registry version {current.number} from {store.where}\n"
        f"committed {current.created_at:%Y-%m-%d %H:%M:%S %Z} by {current.created_by}"
        + (f": {current.reason}" if current.reason else "")
    )
    text = to_toml(current.entries, header)
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")
    else:
        print(text, end="")
    return 0


def _cmd_diff(args: argparse.Namespace) -> int:
    cfg, url = _registry_config(args.config)
    data = _checked_file(cfg, args.file)
    with _opened(url) as store:
        current = store.current()
    changes = diff(current.entries if current is not None else {}, data)
    base = f"version {current.number}" if current is not None else "the empty registry"
    if not changes:
        print(f"no change from {base}")
        return 0
    print(f"from {base} of {store.where} to {args.file}: {summary(changes)}")
    for change in changes:
        print(change)
    return 0


def _cmd_history(args: argparse.Namespace) -> int:
    _, url = _registry_config(args.config)
    previous: Entries = {}
    lines: list[str] = []  # one short line a version; the entries are read a page at a time
    with _opened(url) as store:
        after = 0
        while page := store.history(after=after, limit=_HISTORY_PAGE):
            for v in page:
                when = f"{v.created_at.astimezone():%Y-%m-%d %H:%M:%S %z}"
                why = v.reason or "(no reason given)"
                changes = summary(diff(previous, v.entries))
                lines.append(f"{v.number:>5}  {when}  {v.created_by}  {why}  [{changes}]")
                previous = v.entries
            after = page[-1].number
    if not lines:
        print(f"{store.where}: no version yet")
        return 0
    print("\n".join(reversed(lines)))  # newest first
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    _, url = _registry_config(args.config)
    check = TrailCheck()
    with _opened(url) as store:
        after = 0
        while page := store.history(after=after, limit=_HISTORY_PAGE):
            for version in page:
                for problem in check.add(version):
                    print(problem, flush=True)
            after = page[-1].number
    print(check.summary(store.where))
    return 1 if check.problems else 0


def _cmd_publish_crl(args: argparse.Namespace) -> int:
    from tabadol.registry.crl import publish_crl

    cfg, url = _registry_config(args.config)
    path = args.crl or cfg.broker.pki_dir / "crl.pem"
    with _opened(url) as store:
        number = publish_crl(store, cfg, path, args.by or default_by())
    print(f"{store.where}: published CRL number {number} from {path}; broker nodes take it now")
    return 0


def _version_number(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a version number") from None
    if not 1 <= number < 2**63:
        raise argparse.ArgumentTypeError(f"{number} is not a version number (1 or more)")
    return number


def add_registry_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """``tabadol registry ...`` (docs/registry.md)."""
    registry = sub.add_parser(
        "registry", help="the registry in its database: import, export, diff, history, verify, CRL"
    )
    actions = registry.add_subparsers(dest="registry_command", required=True, metavar="ACTION")

    def action(
        name: str, func: Callable[[argparse.Namespace], int], help: str, description: str = ""
    ) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, help=help, description=description or help)
        parser.add_argument("--config", type=Path, required=True, help="broker configuration")
        parser.set_defaults(func=func)
        return parser

    imp = action(
        "import",
        _cmd_import,
        help="replace the registry with a file's entries, as one new version",
        description="Validate the [[agency]], [[service]], [[grant]] and [[limit]] entries of "
        "FILE (a registry file, or a whole broker configuration) exactly as the broker "
        "validates its own file, against the configuration's contracts, and commit them as "
        "one new version. A file with any error is refused whole; nothing changes.",
    )
    imp.add_argument("file", type=Path, metavar="REGISTRY.toml")
    imp.add_argument("--reason", default="", help="why (kept in the history)")
    imp.add_argument("--by", help="who (default: user@host)")
    imp.add_argument(
        "--skip-to",
        type=_version_number,
        metavar="N",
        help="commit as version N (above the database's newest), even if unchanged: after a "
        "restore or failover that lost versions, so the nodes take it (docs/registry.md)",
    )

    exp = action("export", _cmd_export, help="the current version as TOML (import takes it back)")
    exp.add_argument("--out", type=Path, help="file to write (default: standard output)")

    dif = action("diff", _cmd_diff, help="what importing a file would change, entry by entry")
    dif.add_argument("file", type=Path, metavar="REGISTRY.toml")

    action("history", _cmd_history, help="every version: when, who, why and what changed")

    action(
        "verify",
        _cmd_verify,
        help="check the history: every version's entries, number and audit chain",
        description="Read every version, oldest first, and check that its entries are "
        "registry entries matching its digest, that numbers go up, and that its chain links "
        "it to the version before. Prints one line per problem, naming the version, and "
        "exits 1 if there is any; else the head's chain, to compare with one noted earlier.",
    )

    crl = action(
        "publish-crl",
        _cmd_publish_crl,
        help="store the exchange's CRL in the registry database for every broker node",
        description="Check that CRL (default: the configuration's pki_dir/crl.pem) is signed "
        "by the exchange's CA and newer than the one stored, then store it; broker nodes "
        "take it at once, with the checks they apply to crl.pem.",
    )
    crl.add_argument("crl", type=Path, nargs="?", metavar="CRL")
    crl.add_argument("--by", help="who (default: user@host)")
