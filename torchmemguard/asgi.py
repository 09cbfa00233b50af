"""The ASGI middleware that answers 503 when a request runs out of memory.

``ShedOnOutOfMemory`` wraps any ASGI application (FastAPI, Starlette, ...):
see the guide's section on serving.
"""

from torchmemguard._serving.middleware import ShedOnOutOfMemory

ShedOnOutOfMemory.__module__ = __name__

__all__ = ["ShedOnOutOfMemory"]
