"""One exception hierarchy for the platform side of Tabadol."""


class TabadolError(Exception):
    """Base of every error Tabadol raises on purpose; its message is meant for a person."""


class ConfigError(TabadolError):
    """The broker configuration is invalid; the message names the file, entry and problem."""


class ContractError(TabadolError):
    """A contract (FileDescriptorSet) cannot be loaded or is inconsistent."""


class PkiError(TabadolError):
    """A PKI operation was refused or a certificate, key or CRL could not be used."""
