"""The Open Inference Protocol (KServe v2, Triton's HTTP/REST API) under /v2: health, metadata
and inference with JSON tensors and the binary tensor data extension.

- models: the protocol's objects (wire models), the tensor names and datatypes
- codec: a request's body to `hours`, the scores to an answer's body
- routes: the /v2 routes
- errors: the protocol's error classes, and ProtocolErrors, which answers every /v2 error as
  `{"error": "..."}`
- openapi: the /v2 part of the OpenAPI document

The app (service.http.app) takes the three names below.
"""

from service.http.oip.errors import ProtocolErrors
from service.http.oip.openapi import document
from service.http.oip.routes import router

__all__ = ["ProtocolErrors", "document", "router"]
