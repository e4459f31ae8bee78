"""One error tree for the whole runner; boundaries wrap foreign errors with ``raise ... from e``."""


class AigcError(Exception):
    """Base of every error the runner raises on purpose."""


class SpecError(AigcError, ValueError):
    """Bad input from a user: the message says what to fix; nothing was written."""


class IdempotencyConflict(SpecError):
    """The idempotency key was already used with a different payload."""


class NotFound(AigcError, LookupError):
    """A job, item or model that does not exist."""


class ModelLoadError(AigcError):
    """A model could not be fetched or loaded; the items fail with this reason."""


class GenerationError(AigcError):
    """A backend failed on an item; that item fails, its neighbours do not."""


class TransientError(AigcError):
    """A fault that a retry may cure (storage, database, broker)."""


class StorageError(TransientError):
    """The object store refused or failed a request."""


class DatabaseUnavailable(TransientError):
    """The database could not be reached or is not migrated."""
