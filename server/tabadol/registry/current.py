"""A configuration with the registry in force: the file's own entries, or with
``[registry] url`` the database's current version, checked exactly as a file's."""

from __future__ import annotations

from pathlib import Path

from tabadol import config as config_module
from tabadol.config import BrokerConfig
from tabadol.errors import ConfigError
from tabadol.registry.entries import digest, shape_problem
from tabadol.registry.store import RegistryUnavailable, RegistryVersion, open_registry


def with_version(cfg: BrokerConfig, version: RegistryVersion, where: str) -> BrokerConfig:
    """``cfg`` (its local settings) with a registry version's entries, checked as a file's
    once they are entries at all and match the version's digest."""
    label = f"registry version {version.number} of {where}"
    problem = shape_problem(version.entries)
    if problem is not None:
        raise ConfigError(f"{label}: {problem}")
    if digest(version.entries) != version.digest:
        raise ConfigError(f"{label}: its entries do not match its digest")
    entries = config_module.parse_entries(version.entries, label)
    return config_module.apply_entries(cfg, entries, label, version.number)


def load_current(path: Path) -> BrokerConfig:
    """The configuration at ``path`` with the registry in force now. ConfigError when the
    registry database cannot be read or holds no version yet: the tools that read the
    registry (reports, the ops console, `config check`) need the real one."""
    cfg = config_module.load(path)
    if cfg.registry.url is None:
        return cfg
    store = open_registry(cfg.registry.url)
    try:
        current = store.current()
    except RegistryUnavailable as e:
        raise ConfigError(f"{cfg.path}: [registry] url: {e}") from None
    finally:
        store.close()
    if current is None:
        raise ConfigError(
            f"{cfg.path}: [registry] url: {store.where} holds no registry version yet: "
            f"import one with `tabadol registry import --config {cfg.path} FILE`"
        )
    return with_version(cfg, current, store.where)
