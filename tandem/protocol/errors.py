"""The small set of errors a user can see. Each maps to one HTTP status in the frontend."""

from __future__ import annotations


class TandemError(Exception):
    """Base of user-visible errors. `code` is the OpenAI-style error type string."""

    http_status = 500
    code = "internal_error"


class InvalidRequestError(TandemError):
    """The request can never succeed as sent (bad field, prompt too long, ...)."""

    http_status = 400
    code = "invalid_request_error"


class RequestTooLargeError(InvalidRequestError):
    """The request body is larger than the frontend reads (`TANDEM_MAX_REQUEST_BYTES`)."""

    http_status = 413
    code = "request_too_large"


class ModelNotFoundError(TandemError):
    http_status = 404
    code = "model_not_found"


class OverloadedError(TandemError):
    """No worker can take the request now; retrying later may succeed."""

    http_status = 503
    code = "overloaded"


class BusyError(OverloadedError):
    """Every worker is past its busy limit (load shedding); the router may queue the request."""


class WorkerLostError(TandemError):
    """The worker serving the request died or became unreachable."""

    http_status = 502
    code = "worker_lost"


class TransferFailedError(TandemError):
    """KV blocks could not be moved between workers."""

    http_status = 502
    code = "kv_transfer_failed"


class RequestCancelledError(TandemError):
    http_status = 499
    code = "cancelled"


class CheckpointError(TandemError):
    """A model folder is missing, malformed or of an unsupported architecture."""

    http_status = 500
    code = "checkpoint_error"
