"""The errors of the serving domain, each one gRPC status code (see the .proto's header).

The engine and the request objects (serving/requests.py) raise them; the servicer's
interceptor turns each into its status code and the HTTP front into its HTTP status. No gRPC
here: `code` is the status code's name.
"""

from __future__ import annotations


class ServingError(Exception):
    code = "UNKNOWN"


class NotFound(ServingError):
    code = "NOT_FOUND"


class InvalidArgument(ServingError):
    code = "INVALID_ARGUMENT"


class FailedPrecondition(ServingError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(ServingError):
    code = "RESOURCE_EXHAUSTED"


class Aborted(ServingError):
    code = "ABORTED"


class Unavailable(ServingError):
    code = "UNAVAILABLE"


class DataLoss(ServingError):
    code = "DATA_LOSS"
