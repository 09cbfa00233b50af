"""An HTTP inference service that splits a batch that does not fit, instead of failing.

A small transformer text classifier (random weights from a fixed seed, standing
in for your checkpoint), served by FastAPI, guarded by torchmemguard and held to
a memory budget:

    POST /predict  {"token_ids": [[12, 7, 998], [4, 4, 51]]}
                   -> {"batch_size": 2, "logits": [[...], [...]]}
    GET  /healthz  "ok", the device and the budget in force
    GET  /metrics  Prometheus metrics: torchmemguard's and the process's (also at
                   /metrics/, without a redirect)

Give the budget with exactly one of::

    python examples/inference_service.py --budget 0.8           # of the GPU (or the CPU's RAM)
    python examples/inference_service.py --budget 6GiB
    python examples/inference_service.py --cpu-headroom 256MiB  # CPU: what it holds + 256 MiB

Requests are batched: a ``torchmemguard.Batcher`` gathers the sequences of
concurrent requests of one length into one batch of what fits for that length
(``--max-batch`` sequences while nothing learned says otherwise), waiting at
most ``--batch-wait`` seconds (default 5 ms) for others to join, and answers
each request with its own rows. A batch that runs out of memory under the
budget is split into chunks, retried and merged: the answer is the same, only
slower, ``torchmemguard_oom_total{function="TextClassifier.forward"}`` counts
it, and the next batches of that length are formed to the size learned.

The budget is entered once, around the whole server, rather than around each
call. A cap is per process anyway (while any block is open, every thread is held
to it), so the model's retries and merges run under it just the same; held open,
it is also what ``/healthz`` and the ``torchmemguard_memory_budget_bytes`` gauge
report between requests, instead of only when a scrape lands mid-prediction.

On the CPU the budget caps address space (``RLIMIT_AS``), which counts far more
than tensors: the interpreter and torch's shared libraries (hundreds of MiB),
every thread's stack (8 MiB each) and glibc's malloc arenas (64 MiB for each
thread that allocates). Those depend on the machine, the torch build and the
thread count, so a size written in advance is either refused (below what the
process already holds) or loose. ``--cpu-headroom`` measures instead: the
budget is the address space once the model is loaded and has run, plus the
headroom, which is what the requests may use.

Overloaded, the service answers 413 or 503 rather than a 500, a 400 or a reset
connection. ``torchmemguard.asgi.ShedOnOutOfMemory`` wraps the app:

- a body larger than ``--max-body`` (default 1 MiB) gets a 413, before it is
  read, or as soon as a streamed body passes the limit;
- requests go in while their bodies, added up, fit in ``--in-flight`` bytes
  (default 1 MiB); the others wait their turn, first come, first served, for up
  to ``--max-wait`` seconds (default 10), then get a 503 with ``Retry-After``.
  The model runs one batch at a time anyway; what concurrent requests add up
  beside it is their inputs, the body and its parsed rows (about 40 bytes a
  token as Python lists), so their bodies are what admission counts;
- past ``--max-queue`` requests waiting for a batch (default 1024), a request
  gets a 503 with ``Retry-After``;
- an allocation failure anywhere in a request (reading or parsing the body,
  ``torch.tensor(rows)``, the model, when even the smallest chunk runs out) is
  a 503 with ``Retry-After: 1``.

``torchmemguard_requests_refused_total{reason=...}`` counts each refusal. The
endpoint reads and parses its body itself, with ``json.loads`` and the
pydantic model: FastAPI's own body parsing would turn a ``MemoryError`` into a
400 ("There was an error parsing the body").

Linux only for CPU budgets. Needs the ``examples`` extra (FastAPI, uvicorn).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ipaddress
import json
import re
import sys
from collections.abc import AsyncIterator
from typing import Annotated

import torch
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from pydantic import BaseModel, Field, ValidationError, field_validator

import torchmemguard
from torchmemguard.asgi import ShedOnOutOfMemory

VOCAB, MAX_LENGTH, WIDTH, CLASSES = 1000, 512, 64, 4


class TextClassifier(torch.nn.Module):
    """Token ids (batch, length) in, class logits (batch, CLASSES) out."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = torch.nn.Embedding(VOCAB, WIDTH)
        self.positions = torch.nn.Embedding(MAX_LENGTH, WIDTH)
        layer = torch.nn.TransformerEncoderLayer(
            WIDTH, nhead=4, dim_feedforward=256, dropout=0.0, activation="relu", batch_first=True
        )
        self.encoder = torch.nn.TransformerEncoder(layer, num_layers=2)
        self.head = torch.nn.Linear(WIDTH, CLASSES)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(token_ids.shape[1], device=token_ids.device)
        hidden = self.encoder(self.tokens(token_ids) + self.positions(positions))
        logits: torch.Tensor = self.head(hidden.mean(dim=1))
        return logits


def build_model(seed: int = 0) -> TextClassifier:
    """The classifier, with the same weights on every run, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TextClassifier().eval()


TokenIds = Annotated[
    list[Annotated[int, Field(ge=0, lt=VOCAB)]], Field(min_length=1, max_length=MAX_LENGTH)
]


class PredictRequest(BaseModel):
    """A batch of token id sequences, all of the same length."""

    token_ids: Annotated[list[TokenIds], Field(min_length=1)]

    @field_validator("token_ids")
    @classmethod
    def _equal_lengths(cls, rows: list[list[int]]) -> list[list[int]]:
        for i, row in enumerate(rows):
            if len(row) != len(rows[0]):
                raise ValueError(
                    f"all sequences must have the same length: sequence 0 has "
                    f"{len(rows[0])} tokens, sequence {i} has {len(row)}"
                )
        return rows


def read_rows(body: bytes) -> list[list[int]]:
    """The token ids of a request's body, checked; RequestValidationError (a 422) if invalid.

    ``json.loads`` and pydantic on the parsed object, rather than FastAPI's body
    parameter: that turns every error of parsing, ``MemoryError`` included, into
    a 400, where the middleware should answer 503.
    """
    try:
        data = json.loads(body)
    except ValueError as exc:  # not JSON, or not UTF-8
        position = getattr(exc, "pos", 0)
        error = {"type": "json_invalid", "loc": ("body", position), "msg": "JSON decode error"}
        raise RequestValidationError([{**error, "input": {}, "ctx": {"error": str(exc)}}]) from None
    try:
        return PredictRequest.model_validate(data).token_ids
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in errors]
        ) from None


class PredictResponse(BaseModel):
    batch_size: int
    logits: list[list[float]]


class BudgetInForce(BaseModel):
    bytes: int
    fraction: float
    description: str


class Health(BaseModel):
    status: str
    device: str
    budget: BudgetInForce | None


class Predictor:
    """Batches the requests for the guarded model: a :class:`torchmemguard.Batcher`, whose
    one worker thread runs the batches, so that no thread starts later.

    Requests of one length wait together, and a group runs once it holds as many
    sequences as the guard knows fit for that length (``max_batch`` while
    nothing says otherwise), or after ``batch_wait`` seconds. Under a CPU cap a
    new thread needs room for its stack and may not get it. A plain ``def``
    endpoint would run in anyio's pool, which starts up to 40 threads on
    demand; here the endpoints are ``async def``, and the batcher's worker (with
    torch's intra-op threads) starts in :meth:`warm_up`, before the address
    space is measured.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        batch_wait: float = 0.005,
        max_batch: int = 64,
        max_queue: int = 1024,
    ) -> None:
        self.model = torchmemguard.guard(model.to(device))
        self.device = device
        self.batcher = torchmemguard.Batcher(
            self.model, max_wait=batch_wait, max_batch=max_batch, max_queue=max_queue
        )

    def warm_up(self, batch_size: int = 8, length: int = 128) -> None:
        """Run a batch of a typical size on the batcher's thread, which starts torch's.

        Its size matters: the BLAS (MKL) keeps the work buffers of its first
        large matrix product, about 9 MiB here, which must be in the address
        space before it is measured, not taken from the headroom later.
        """
        asyncio.run(self.predict([[0] * length] * batch_size))

    async def predict(self, rows: list[list[int]]) -> list[list[float]]:
        """The logits of a request's sequences, once the batch it joined ran."""
        token_ids = torch.tensor(rows, dtype=torch.long, device=self.device)
        logits: list[list[float]] = (await self.batcher(token_ids)).cpu().tolist()
        return logits

    def close(self) -> None:
        self.batcher.close()


def create_app(
    predictor: Predictor,
    max_body_bytes: int = 2**20,
    max_bytes_in_flight: int = 2**20,
    max_wait: float = 10.0,
) -> FastAPI:
    """The service's routes around ``predictor``, behind :class:`ShedOnOutOfMemory`."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        predictor.close()

    app = FastAPI(title="torchmemguard inference service", lifespan=lifespan)
    # Inside FastAPI's outermost layer, which would answer an unhandled error with a 500.
    app.add_middleware(
        ShedOnOutOfMemory,
        max_body_bytes=max_body_bytes,
        max_bytes_in_flight=max_bytes_in_flight,
        max_wait=max_wait,
    )
    torchmemguard.install_metrics()

    # Mounted, prometheus_client's ASGI app would answer /metrics with a redirect
    # to /metrics/: serve both paths directly, in the Prometheus text format.
    @app.get("/metrics", include_in_schema=False)
    @app.get("/metrics/", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    # The body is read in the endpoint (see read_rows); its schema is declared here.
    body = {"content": {"application/json": {"schema": PredictRequest.model_json_schema()}}}

    @app.post("/predict", openapi_extra={"requestBody": {**body, "required": True}})
    async def predict(request: Request) -> PredictResponse:
        rows = read_rows(await request.body())
        # An out-of-memory error, even torchmemguard.OutOfMemoryError when not even the
        # smallest chunk fitted, goes up to the middleware, which answers 503.
        logits = await predictor.predict(rows)
        return PredictResponse(batch_size=len(logits), logits=logits)

    @app.get("/healthz")
    async def healthz() -> Health:
        budget = torchmemguard.current_budget(predictor.device)
        in_force = None
        if budget is not None:
            in_force = BudgetInForce(
                bytes=budget.bytes, fraction=budget.fraction, description=str(budget)
            )
        return Health(status="ok", device=str(predictor.device), budget=in_force)

    return app


def address_space() -> int:
    """Bytes of address space this process uses now (``VmSize``)."""
    with contextlib.suppress(OSError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024  # in kB
    raise RuntimeError("no VmSize in /proc/self/status: this needs Linux")


_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6}


def parse_size(text: str, flag: str) -> int:
    """A positive byte count from ``text``, such as ``'256MiB'``, given to ``flag``."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = found.group(2).lower() if found else None
    if found is None or unit not in _UNITS:
        raise ValueError(
            f"{flag}={text!r} is not a size: write a number and a unit, such as 256MiB"
        )
    size = int(float(found.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"{flag}={text!r} must be a positive number of bytes")
    return size


def make_the_cap_see_all_memory() -> None:
    """Set glibc's malloc up so that a CPU cap sees every large allocation, at once.

    One arena: by default each thread that allocates gets an arena of its own,
    which reserves 64 MiB of address space up front; when the cap refuses a new
    mapping, glibc serves the thread from that reservation instead, so the
    model's thread would get up to 64 MiB more than the headroom.

    A fixed mmap threshold: by default glibc raises it after large blocks are
    freed, and keeps later ones in its heap, where freed memory may stay mapped.
    Fixed at 64 KiB, every block from 64 KiB up is mapped when allocated and
    unmapped when freed, so the headroom is the same for every request, and the
    guard's measurement of a chunk's peak (the resident set) sees those blocks.

    Call it before any thread starts.
    """
    m_mmap_threshold, m_arena_max = -3, -8  # from glibc's <malloc.h>
    with contextlib.suppress(OSError, AttributeError):  # not glibc: the cap is only looser
        libc = ctypes.CDLL(None)
        libc.mallopt(m_arena_max, 1)
        libc.mallopt(m_mmap_threshold, 2**16)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--host",
        type=ipaddress.ip_address,
        default="127.0.0.1",
        help="an IP address: asyncio resolves a name on a thread, which would start under the cap",
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", type=torch.device, default=torch.device(default_device))
    parser.add_argument("--threads", type=int, default=1, help="torch's intra-op threads")
    parser.add_argument(
        "--max-body", metavar="SIZE", default="1MiB", help="the largest request body (413 past it)"
    )
    parser.add_argument(
        "--in-flight",
        metavar="SIZE",
        default="1MiB",
        help="the request bodies let in at once; the other requests wait their turn",
    )
    parser.add_argument(
        "--max-wait",
        metavar="SECONDS",
        type=float,
        default=10.0,
        help="how long a request waits for its turn before a 503",
    )
    parser.add_argument(
        "--batch-wait",
        metavar="SECONDS",
        type=float,
        default=0.005,
        help="how long a request waits for others of its length to batch with",
    )
    parser.add_argument(
        "--max-batch",
        metavar="SEQUENCES",
        type=int,
        default=64,
        help="the most sequences in one batch, while nothing learned says what fits",
    )
    parser.add_argument(
        "--max-queue",
        metavar="REQUESTS",
        type=int,
        default=1024,
        help="the most requests waiting for a batch (503 past it)",
    )
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument(
        "--budget", help="a fraction of the device's memory (0.8) or a size (6GiB, 512MB)"
    )
    budget.add_argument(
        "--cpu-headroom",
        metavar="SIZE",
        help="CPU only: the budget is the address space once the model is warm, plus SIZE",
    )
    args = parser.parse_args(argv)
    try:
        if args.cpu_headroom is not None:
            if args.device.type != "cpu":
                parser.error(f"--cpu-headroom is for the CPU; on {args.device} give --budget")
            args.cpu_headroom = parse_size(args.cpu_headroom, "--cpu-headroom")
        else:
            args.budget = _fraction_or_size(args.budget)
        args.max_body = parse_size(args.max_body, "--max-body")
        args.in_flight = parse_size(args.in_flight, "--in-flight")
    except ValueError as exc:
        parser.error(str(exc))
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if not 0 < args.max_wait < float("inf"):
        parser.error(f"--max-wait must be a positive number of seconds, got {args.max_wait}")
    if not 0 <= args.batch_wait < float("inf"):
        parser.error(f"--batch-wait must be at least 0 seconds, got {args.batch_wait}")
    for flag, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue)):
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    return args


def _fraction_or_size(text: str) -> float | int:
    try:
        fraction = float(text)
    except ValueError:
        return parse_size(text, "--budget")
    if not 0 < fraction <= 1:
        raise ValueError(f"--budget={text!r}: give a fraction in (0, 1] or a size such as 6GiB")
    return fraction


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device.type == "cpu":
        make_the_cap_see_all_memory()
    torch.set_num_threads(args.threads)
    predictor = Predictor(
        build_model(), args.device, args.batch_wait, args.max_batch, args.max_queue
    )
    app = create_app(predictor, args.max_body, args.in_flight, args.max_wait)
    predictor.warm_up()

    if args.cpu_headroom is not None:  # measured now: the model is loaded and warm
        cap = address_space() + args.cpu_headroom
        budget = torchmemguard.memory_budget(bytes=cap, device="cpu")
    elif isinstance(args.budget, float):
        budget = torchmemguard.memory_budget(args.budget, device=args.device)
    else:
        budget = torchmemguard.memory_budget(bytes=args.budget, device=args.device)
    # In force for the server's whole life (see the module docstring).
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(budget)
        except torchmemguard.BudgetExceededError as exc:
            sys.exit(f"inference_service: {exc}")
        # asyncio's loop and h11's parser, pure Python, even where uvloop and httptools
        # are installed: under a CPU cap they abort the process on a failed
        # allocation, where Python raises MemoryError and the service answers 503.
        uvicorn.run(app, host=str(args.host), port=args.port, loop="asyncio", http="h11")


if __name__ == "__main__":
    main()
