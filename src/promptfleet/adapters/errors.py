"""Errors of the adapter registry (each message says what is wrong)."""
from __future__ import annotations


class AdapterRejected(ValueError):
    """An upload or registration refused by validation; nothing was stored."""


class InvalidAdapterName(AdapterRejected):
    """A name that is not a slug ``^[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}$``."""


class AdapterNotFound(LookupError):
    """No such adapter (or version) for this tenant -- also what another tenant's adapter looks like."""


class AdapterIncompatible(ValueError):
    """An adapter made for another backbone than the one serving."""


class AdapterConflict(RuntimeError):
    """Concurrent writes kept taking the version number this write needed."""
