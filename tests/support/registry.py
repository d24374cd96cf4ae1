"""A broker whose registry lives in PostgreSQL: its configuration file, registry files to
import, and the ``tabadol registry`` command run in-process."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from tabadol import cli
from tabadol.errors import TabadolError
from tests.conftest import AGENCIES, DEFAULT_GRANTS, TRUST_DOMAIN
from tests.support.echo import SERVICE


def registry_config(
    directory: Path, pki_dir: Path, contracts: Path, url: str, registry: str = ""
) -> Path:
    """A broker configuration with ``[registry] url`` and no entries of its own."""
    path = directory / "broker.toml"
    path.write_text(
        f"""[broker]
listen = "127.0.0.1:0"
trust_domain = "{TRUST_DOMAIN}"
pki_dir = "{pki_dir}"
contracts = ["{contracts}"]
metrics_listen = "127.0.0.1:0"

[tracing]
exporter = "none"

[registry]
url = "{url}"
poll_seconds = 0.2
{registry}
"""
    )
    return path


def registry_toml(
    endpoints: list[str], grants: str = DEFAULT_GRANTS, agencies: tuple[str, ...] = AGENCIES
) -> str:
    """A registry-only file: the agencies, the echo service and ``grants``."""
    listed = "".join(f'[[agency]]\nid = "{a}"\nname = "Agency {a}"\n\n' for a in agencies)
    endpoint_list = ", ".join(f'"{e}"' for e in endpoints)
    return f"""{listed}[[service]]
name = "{SERVICE}"
provider = "echo"
endpoints = [{endpoint_list}]
{grants}"""


def tabadol(*argv: str) -> tuple[int, str, str]:
    """Run the ``tabadol`` command in this process: exit status, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def import_registry(config: Path, file: Path, reason: str = "test", by: str = "tester") -> str:
    code, out, err = tabadol(
        "registry", "import", "--config", str(config), str(file), "--reason", reason, "--by", by
    )
    if code != 0:
        raise TabadolError(err)
    return out


def imported_registry(
    directory: Path,
    pki_dir: Path,
    contracts: Path,
    url: str,
    entries: str,
    reason: str = "the first registry",
    by: str = "tester",
) -> Path:
    """A broker configuration on the registry at ``url``, holding ``entries`` as its first
    version; the configuration's path."""
    path = registry_config(directory, pki_dir, contracts, url)
    file = directory / "registry.toml"
    file.write_text(entries)
    import_registry(path, file, reason=reason, by=by)
    return path


__all__ = [
    "TabadolError",
    "import_registry",
    "imported_registry",
    "registry_config",
    "registry_toml",
    "tabadol",
]
