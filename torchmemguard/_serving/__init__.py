"""Serving: the ASGI middleware and its admission by request size."""
