"""Exceptions raised on bad input; each maps to one gRPC status code in the service."""


class KVCacheError(Exception):
    """Base of every error kvcache raises on purpose; `grpc_code` names its wire status."""

    grpc_code = "INTERNAL"


class InvalidParameter(KVCacheError, ValueError):
    """A method parameter or config value is out of its allowed range."""

    grpc_code = "INVALID_ARGUMENT"


class ShapeMismatch(InvalidParameter):
    """A tensor's shape is not the one the call expects."""


class DTypeMismatch(InvalidParameter):
    """A tensor's dtype is not the store's dtype."""


class SequenceNotFound(KVCacheError, KeyError):
    """The sequence id is unknown (never created, or already freed)."""

    grpc_code = "NOT_FOUND"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class PositionOutOfRange(KVCacheError, IndexError):
    """Positions are out of order, beyond the sequence, or beyond its page budget."""

    grpc_code = "OUT_OF_RANGE"


class StoreFull(KVCacheError, MemoryError):
    """Not enough free pages for the request; nothing was changed."""

    grpc_code = "RESOURCE_EXHAUSTED"


class CallTooLarge(KVCacheError, MemoryError):
    """A call would need more working memory than the store allows one call; nothing was done."""

    grpc_code = "RESOURCE_EXHAUSTED"


class QuotaExceeded(KVCacheError, MemoryError):
    """The calling client already holds as many sequences or pages as the server allows one client."""

    grpc_code = "RESOURCE_EXHAUSTED"


class MessageTooLarge(KVCacheError, ValueError):
    """A request or reply exceeds the configured maximum message size."""

    grpc_code = "RESOURCE_EXHAUSTED"


class Unavailable(KVCacheError, ConnectionError):
    """The server is shutting down or cannot be reached; the call may be retried elsewhere."""

    grpc_code = "UNAVAILABLE"


class Unauthenticated(KVCacheError, PermissionError):
    """The bearer token is missing or wrong."""

    grpc_code = "UNAUTHENTICATED"


class NotSupported(KVCacheError, NotImplementedError):
    """The call exists in the wire contract but is not implemented yet."""

    grpc_code = "UNIMPLEMENTED"


class RemoteError(KVCacheError, RuntimeError):
    """The server failed in a way no other error describes (a bug there; see its log)."""

    grpc_code = "INTERNAL"


class PageCorrupted(KVCacheError, IOError):
    """A page read back from the host or disk tier failed its checksum; no attention was computed from it."""

    grpc_code = "DATA_LOSS"


class PlanStale(KVCacheError):
    """A decode step's plan no longer describes its sequences (one was freed, forked or appended outside the step,
    or the plan is unknown to the server): plan the step again."""

    grpc_code = "FAILED_PRECONDITION"


class SequenceLeased(KVCacheError):
    """The sequence is in a decode step leased to an engine that writes its rows in the shared pool: no other call
    may change it until that step is committed, aborted or its lease runs out."""

    grpc_code = "ABORTED"


class GateMissing(KVCacheError, LookupError):
    """Method `gate` was asked of a store that holds no trained page gate (train one, then serve with --gate)."""

    grpc_code = "FAILED_PRECONDITION"


class GateFileInvalid(KVCacheError, ValueError):
    """A gate weights file is corrupt, truncated, or made for another model shape; nothing was loaded."""

    grpc_code = "INVALID_ARGUMENT"


class AllocationInvalid(KVCacheError, ValueError):
    """A byte allocation file is missing, malformed, or measured for another model shape; nothing was attached."""

    grpc_code = "INVALID_ARGUMENT"
