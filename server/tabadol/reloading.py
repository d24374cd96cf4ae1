"""What a configuration reload may not change. Pure: two validated configurations in, the
reasons to refuse the new one out (none: it may be applied)."""

from __future__ import annotations

from tabadol.config import BrokerConfig
from tabadol.governance import breaking_changes

# Settings a running broker holds for its whole life: its listening socket, the names it
# trusts, the message size its server was built with, its span pipeline and ledger.
FIXED_SETTINGS = ("listen", "trust_domain", "max_message_bytes")
FIXED_SECTIONS = ("tracing", "ledger", "gateway")


def reload_refusals(old: BrokerConfig, new: BrokerConfig) -> list[str]:
    """Why ``new`` may not replace ``old`` in a running broker, each naming the file and
    the setting; empty when it may."""
    refusals = [
        f"{new.path}: [broker] {setting} cannot change on reload; restart the broker"
        for setting in FIXED_SETTINGS
        if getattr(new.broker, setting) != getattr(old.broker, setting)
    ]
    refusals += [
        f"{new.path}: [{section}] cannot change on reload; restart the broker"
        for section in FIXED_SECTIONS
        if getattr(new, section) != getattr(old, section)
    ]
    breaking = breaking_changes(old.contracts.files.values(), new.contracts.files.values())
    if breaking:
        # A contract that breaks its consumers within a major version is refused: such a
        # change needs a new version (v2) beside the old one.
        refusals.append(
            f"{new.path}: [broker] contracts: {len(breaking)} change(s) would break "
            "consumers; publish them as a new major version instead:\n"
            + "\n".join(f"  {b}" for b in breaking)
        )
    return refusals
