"""End to end: the example inference service under a real CPU cap, scraped by a real Prometheus.

``examples/inference_service.py`` runs in a subprocess with a CPU budget of its
address space (once the model is warm) plus ``HEADROOM_MIB``. A request of 128
sequences of 128 tokens then runs out of memory for real (``DefaultCPUAllocator:
can't allocate memory``) and the guard answers it in chunks, while a small
request fits whole. On this project's development machine that holds for every
headroom from 2 to 48 MiB, the same on every run: the small request fits from
2 MiB up, and the large one fits whole from 56 MiB up. 24 MiB sits in the
middle; there the large request is answered in chunks of 32 after two errors.

Prometheus (``prometheus`` on the PATH) scrapes the service every second and
loads ``examples/prometheus/alerts.yml``; the tests read what it got through its
HTTP API. Where it is not installed those tests are skipped, except under CI
(``CI=true``), where they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import importlib.util
import json
import os
import random
import re
import shutil
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests import dashboard
from tests.asgi_calls import Exchange, scope
from tests.servers import Server, Servers, free_port, get_text, query_url, request_json, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not sys.platform.startswith("linux"), reason="needs RLIMIT_AS and /proc (Linux)"
    ),
]

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVICE = REPO_ROOT / "examples" / "inference_service.py"
ALERT_RULES = REPO_ROOT / "examples" / "prometheus" / "alerts.yml"
HEADROOM_MIB = 24
VOCAB = 1000  # the example's
FUNCTION = "TextClassifier.forward"  # the guard's label: the guarded callable's __qualname__
JOB = "inference_service"
LARGE = (128, 128)  # sequences, tokens: runs out of memory whole under the budget
SMALL = (4, 16)  # fits whole
STARTUP_S = 30  # deadline for a server to answer
# Deadline for Prometheus to see something. It applies its targets about 5 s after it
# starts; from then on it scrapes and evaluates the rules every second.
POLL_S = 15
# Chunks may take other matrix kernels than the whole batch (see test_end_to_end.py).
RTOL = ATOL = 1e-5


@dataclass
class Service:
    url: str
    pid: int
    server: Server


@pytest.fixture(scope="module")
def servers() -> Servers:
    return Servers()


@contextlib.contextmanager
def start_service(
    servers: Servers, tmp_path_factory: pytest.TempPathFactory, name: str, *flags: str
) -> Iterator[Service]:
    port = free_port()
    command = [sys.executable, str(SERVICE), "--port", str(port), "--device", "cpu"]
    command += ["--cpu-headroom", f"{HEADROOM_MIB}MiB", *flags]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    log = tmp_path_factory.mktemp(name) / "output.log"
    with servers.run(name, command, log, cwd=REPO_ROOT, env=env) as server:
        url = f"http://127.0.0.1:{port}"
        wait_for("answer from /healthz", lambda: _ok(f"{url}/healthz"), STARTUP_S, servers)
        yield Service(url, server.process.pid, server)


@pytest.fixture(scope="module")
def service(servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with start_service(servers, tmp_path_factory, "service") as service:
        yield service


@pytest.fixture(scope="module")
def prometheus(
    servers: Servers, service: Service, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    binary = shutil.which("prometheus")
    if binary is None:
        reason = "prometheus is not installed (Debian and Ubuntu: apt-get install prometheus)"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"{reason}; under CI this test must run, not be skipped")
        pytest.skip(reason)
    directory = tmp_path_factory.mktemp("prometheus")
    config = {  # JSON is YAML
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERT_RULES)],
        "scrape_configs": [
            {
                "job_name": JOB,
                "static_configs": [{"targets": [service.url.removeprefix("http://")]}],
            }
        ],
    }
    (directory / "prometheus.yml").write_text(json.dumps(config, indent=2))
    port = free_port()
    command = [
        binary,
        f"--config.file={directory / 'prometheus.yml'}",
        f"--storage.tsdb.path={directory / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with servers.run("prometheus", command, directory / "output.log", cwd=directory):
        url = f"http://127.0.0.1:{port}"
        wait_for("ready Prometheus", lambda: _ok_text(f"{url}/-/ready"), STARTUP_S, servers)
        yield url


@pytest.fixture(scope="module")
def example() -> ModuleType:
    """The service's module, imported here for its model and its command line."""
    spec = importlib.util.spec_from_file_location("inference_service", SERVICE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference_model(example: ModuleType) -> torch.nn.Module:
    model: torch.nn.Module = example.build_model()
    return model


@pytest.fixture(scope="module")
def large_answer(service: Service) -> tuple[list[list[int]], int, Any]:
    """The large request, sent once: its token ids, the status and the answer."""
    rows = token_ids(*LARGE, seed=1)
    status, answer = request_json(f"{service.url}/predict", {"token_ids": rows})
    return rows, status, answer


def token_ids(batch: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(length)] for _ in range(batch)]


def reference(model: torch.nn.Module, rows: list[list[int]]) -> torch.Tensor:
    with torch.inference_mode():
        logits: torch.Tensor = model(torch.tensor(rows))
        return logits


def _ok(url: str) -> Any:
    status, answer = request_json(url, timeout=2)
    return answer if status == 200 else None


def _ok_text(url: str) -> str:
    return get_text(url, timeout=2)


def guard_count(service: Service, name: str) -> float:
    """A guard counter of the predict function, read from the service's own /metrics."""
    for family in text_string_to_metric_families(get_text(f"{service.url}/metrics")):
        for sample in family.samples:
            if sample.name == f"torchmemguard_{name}_total" and sample.labels == {
                "function": FUNCTION,
                "device": "cpu",
            }:
                return sample.value
    return 0.0  # the counter appears with its first event


def address_space(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmSize for process {pid}")


def query(prometheus: str, promql: str) -> list[dict[str, Any]]:
    """The instant vector of ``promql``; a failed query raises ValueError."""
    status, answer = request_json(query_url(prometheus, "/api/v1/query", query=promql))
    if status != 200 or answer.get("status") != "success":
        raise ValueError(f"query {promql!r} answered {status}: {answer}")
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def value(prometheus: str, promql: str) -> float | None:
    """The value of the first series of ``promql``, or None while there is none."""
    result = query(prometheus, promql)
    return float(result[0]["value"][1]) if result else None


# ---------------------------------------------------------------------------
# The command line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "one of the arguments --budget --cpu-headroom is required"),
        (["--budget", "0.5", "--cpu-headroom", "1GiB"], "not allowed with argument"),
        (["--budget", "1.5"], "give a fraction in (0, 1] or a size such as 6GiB"),
        (["--budget", "lots"], "--budget='lots' is not a size"),
        (["--cpu-headroom", "0MiB"], "must be a positive number of bytes"),
        (["--device", "cuda", "--cpu-headroom", "1GiB"], "--cpu-headroom is for the CPU"),
        (["--host", "localhost", "--budget", "0.5"], "invalid ip_address value"),
        (["--budget", "0.5", "--max-body", "big"], "--max-body='big' is not a size"),
        (["--budget", "0.5", "--in-flight", "0"], "--in-flight='0' must be a positive"),
        (["--budget", "0.5", "--max-wait", "0"], "--max-wait must be a positive number"),
        (["--budget", "0.5", "--batch-wait", "-1"], "--batch-wait must be at least 0"),
        (["--budget", "0.5", "--max-batch", "0"], "--max-batch must be at least 1"),
    ],
    ids=[
        "neither",
        "both",
        "fraction past 1",
        "not a size",
        "no headroom",
        "cuda",
        "host name",
        "max body",
        "in flight",
        "max wait",
        "batch wait",
        "max batch",
    ],
)
def test_command_line_refuses_a_budget_that_is_not_exactly_one_valid_option(
    example: ModuleType, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        example.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_command_line_reads_the_limits_of_admission(example: ModuleType) -> None:
    args = example.parse_args(["--budget", "0.5", "--max-body", "2MiB", "--in-flight", "64KiB"])
    assert (args.max_body, args.in_flight, args.max_wait) == (2 * 2**20, 64 * 2**10, 10.0)


def test_command_line_reads_the_batching(example: ModuleType) -> None:
    args = example.parse_args(["--budget", "0.5", "--batch-wait", "0.02", "--max-batch", "16"])
    assert (args.batch_wait, args.max_batch, args.max_queue) == (0.02, 16, 1024)


@pytest.mark.parametrize(
    ("argv", "budget", "headroom"),
    [
        (["--budget", "0.8"], 0.8, None),
        (["--budget", "6GiB"], 6 * 2**30, None),
        (["--cpu-headroom", "24MiB"], None, 24 * 2**20),
    ],
)
def test_command_line_reads_a_fraction_or_a_size(
    example: ModuleType, argv: list[str], budget: float | None, headroom: int | None
) -> None:
    args = example.parse_args(argv)
    assert (args.budget, args.cpu_headroom) == (budget, headroom)


# ---------------------------------------------------------------------------
# The service alone


def test_healthz_reports_the_cpu_budget_of_address_space_plus_headroom(
    service: Service, servers: Servers
) -> None:
    status, health = request_json(f"{service.url}/healthz")
    assert status == 200, f"{health}\n{servers.report()}"
    assert health["status"] == "ok", health
    assert health["device"] == "cpu", health
    budget = health["budget"]
    assert budget is not None, f"no budget in force: {health}"
    assert budget["description"].endswith(" of cpu"), health
    room = budget["bytes"] - address_space(service.pid)
    assert 0 < room <= HEADROOM_MIB * 2**20, f"{room / 2**20:.1f} MiB left under the cap: {health}"


def test_small_request_is_answered_like_the_reference_without_running_out_of_memory(
    service: Service, servers: Servers, reference_model: torch.nn.Module
) -> None:
    rows = token_ids(*SMALL, seed=0)
    ooms_before = guard_count(service, "oom")
    status, answer = request_json(f"{service.url}/predict", {"token_ids": rows})
    assert status == 200, f"{answer}\n{servers.report()}"
    assert answer["batch_size"] == SMALL[0], answer
    expected = reference(reference_model, rows)
    assert torch.allclose(torch.tensor(answer["logits"]), expected, rtol=RTOL, atol=ATOL), answer
    assert guard_count(service, "oom") == ooms_before, "the small request ran out of memory"


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ([], "at least 1 item"),
        ([[1, 2, 3], [4, 5]], "same length: sequence 0 has 3 tokens, sequence 1 has 2"),
        ([[1, 2, VOCAB]], f"less than {VOCAB}"),
        ([[-1]], "greater than or equal to 0"),
        ([[]], "at least 1 item"),
    ],
    ids=["empty batch", "ragged rows", "id past the vocabulary", "negative id", "empty sequence"],
)
def test_bad_request_is_refused_with_a_422_that_says_why(
    service: Service, servers: Servers, batch: list[list[int]], message: str
) -> None:
    status, answer = request_json(f"{service.url}/predict", {"token_ids": batch})
    assert status == 422, f"{answer}\n{servers.report()}"
    assert any(message in error["msg"] for error in answer["detail"]), answer


def test_large_request_is_split_and_answered_like_the_reference(
    service: Service,
    servers: Servers,
    reference_model: torch.nn.Module,
    large_answer: tuple[list[list[int]], int, Any],
) -> None:
    rows, status, answer = large_answer
    assert status == 200, f"{answer}\n{servers.report()}"
    assert answer["batch_size"] == LARGE[0], answer
    logits = torch.tensor(answer["logits"])
    expected = reference(reference_model, rows)
    assert logits.shape == expected.shape, answer
    difference = (logits - expected).abs().max().item()
    assert torch.allclose(logits, expected, rtol=RTOL, atol=ATOL), f"differs by {difference}"
    assert guard_count(service, "split_calls") >= 1, f"not split\n{servers.report()}"


# ---------------------------------------------------------------------------
# Out of memory at every step of a request, in the test process


@pytest.mark.parametrize("step", ["reading the body", "parsing", "validating", "the tensor"])
def test_out_of_memory_at_any_step_of_a_request_is_a_503(
    example: ModuleType, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    def out_of_memory(*args: object, **kwargs: object) -> Any:
        if step == "the tensor":
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate")
        raise MemoryError

    body = json.dumps({"token_ids": token_ids(*SMALL, seed=0)}).encode()
    exchange = Exchange([body])
    if step == "reading the body":
        monkeypatch.setattr(exchange, "receive", out_of_memory)
    elif step == "parsing":
        monkeypatch.setattr(example.json, "loads", out_of_memory)
    elif step == "validating":
        monkeypatch.setattr(example.PredictRequest, "model_validate", out_of_memory)
    else:
        monkeypatch.setattr(example.torch, "tensor", out_of_memory)
    predictor = example.Predictor(example.build_model(), torch.device("cpu"))
    try:
        app = example.create_app(predictor)
        asyncio.run(app(scope([body]), exchange.receive, exchange.send))
    finally:
        predictor.close()
        monkeypatch.undo()  # json.loads reads the answer
    assert (exchange.status, exchange.headers["retry-after"]) == (503, "1"), exchange.sent
    assert exchange.body == {"detail": "Out of memory for this request; retry after 1 s"}


# ---------------------------------------------------------------------------
# Seen through Prometheus


@pytest.mark.parametrize("path", ["/metrics", "/metrics/"])
def test_metrics_are_served_with_and_without_the_slash_and_no_redirect(
    service: Service, path: str
) -> None:
    host, port = service.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read().decode()
    finally:
        connection.close()
    assert response.status == 200
    assert response.getheader("Content-Type", "").startswith("text/plain")
    assert "torchmemguard_memory_reserved_bytes" in body


def test_prometheus_scrapes_the_service_as_a_healthy_target(
    prometheus: str, servers: Servers
) -> None:
    def service_target() -> dict[str, Any] | None:
        status, answer = request_json(f"{prometheus}/api/v1/targets")
        for target in answer["data"]["activeTargets"] if status == 200 else []:
            if target["labels"].get("job") == JOB and target["health"] == "up":
                return dict(target)
        return None

    target = wait_for("target up", service_target, POLL_S, servers)
    assert target["lastError"] == "", f"{target}\n{servers.report()}"
    up = wait_for("up == 1", lambda: value(prometheus, f'up{{job="{JOB}"}} == 1'), POLL_S, servers)
    assert up == 1


def test_prometheus_receives_the_cpu_memory_ratio_and_the_budget(
    prometheus: str, service: Service, servers: Servers
) -> None:
    ratio = wait_for(
        "torchmemguard_memory_used_ratio",
        lambda: value(prometheus, f'torchmemguard_memory_used_ratio{{job="{JOB}",device="cpu"}}'),
        POLL_S,
        servers,
    )
    assert 0 < ratio < 1, ratio
    budget = wait_for(
        "torchmemguard_memory_budget_bytes",
        lambda: value(prometheus, f'torchmemguard_memory_budget_bytes{{job="{JOB}",device="cpu"}}'),
        POLL_S,
        servers,
    )
    _, health = request_json(f"{service.url}/healthz")
    assert budget == health["budget"]["bytes"], f"Prometheus has {budget}, the service {health}"


def test_prometheus_counts_the_out_of_memory_errors_of_the_split_request(
    prometheus: str, servers: Servers, large_answer: tuple[list[list[int]], int, Any]
) -> None:
    _, status, answer = large_answer
    assert status == 200, f"{answer}\n{servers.report()}"
    series = f'torchmemguard_oom_total{{job="{JOB}",function="{FUNCTION}",device="cpu"}}'
    ooms = wait_for(f"{series} > 0", lambda: value(prometheus, f"{series} > 0"), POLL_S, servers)
    assert ooms >= 1


def test_alert_rules_are_loaded_and_evaluated_without_errors(
    prometheus: str, servers: Servers
) -> None:
    names = set(re.findall(r"^\s*-\s*(?:alert|record):\s*(\S+)", ALERT_RULES.read_text(), re.M))
    assert names, f"no rules found in {ALERT_RULES}"

    def evaluated_rules() -> list[dict[str, Any]] | None:
        status, answer = request_json(f"{prometheus}/api/v1/rules")
        if status != 200:
            return None
        rules = [rule for group in answer["data"]["groups"] for rule in group["rules"]]
        done = {rule["name"] for rule in rules} >= names and all(
            rule["health"] != "unknown" for rule in rules
        )
        return rules if done else None

    rules = wait_for("rules evaluated", evaluated_rules, POLL_S, servers)
    assert {rule["name"] for rule in rules} == names, rules
    broken = [rule for rule in rules if rule["health"] != "ok" or rule.get("lastError")]
    assert not broken, f"{broken}\n{servers.report()}"


def test_every_dashboard_panel_query_returns_data(
    prometheus: str,
    service: Service,
    servers: Servers,
    large_answer: tuple[list[list[int]], int, Any],
) -> None:
    # The large request ran out of memory and was split: OOMs, a chunk size, a peak.
    assert large_answer[1] == 200, f"{large_answer[2]}\n{servers.report()}"
    for seed in range(10):  # past the guard's first sampled call: retained bytes
        status, answer = request_json(
            f"{service.url}/predict", {"token_ids": token_ids(*SMALL, seed=seed)}
        )
        assert status == 200, answer
    queries = dashboard.queries(JOB)
    assert len(queries) >= 8

    missing: list[tuple[str, str, str]] = []

    def all_answered() -> bool | None:
        missing[:] = [found for found in queries if not query(prometheus, found[2])]
        return None if missing else True

    try:
        wait_for("data for every panel query", all_answered, POLL_S, servers)
    except AssertionError as exc:
        raise AssertionError(f"panel queries without data: {missing}") from exc


def test_concurrent_requests_of_one_length_are_answered_from_one_batch(
    example: ModuleType, reference_model: torch.nn.Module
) -> None:
    model = example.build_model()
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    predictor = example.Predictor(model, torch.device("cpu"), batch_wait=0.2)
    sent = [token_ids(*SMALL, seed=seed) for seed in range(8)]

    async def main() -> list[list[list[float]]]:
        return await asyncio.gather(*(predictor.predict(rows) for rows in sent))

    try:
        answers = asyncio.run(main())
    finally:
        predictor.close()
    # One batch of the 8 requests' 4 sequences each, and the first request once more
    # on its own, the batcher's check that rows do not depend on each other.
    assert sizes == [32, 4]
    for rows, logits in zip(sent, answers, strict=True):
        expected = reference(reference_model, rows)
        assert torch.allclose(torch.tensor(logits), expected, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------
# Under load: 200 requests from 16 clients at once, valid or not

LOAD_REQUESTS, LOAD_CLIENTS = 200, 16
LOAD_FLAGS = ("--max-body", "256KiB", "--in-flight", "256KiB", "--max-wait", "30")
LOAD_TIMEOUT_S = 60  # for each request
# The share of each kind of request, and what it may be answered.
LOAD_MIX = {"small": 10, "large": 3, "larger": 1, "oversized": 2, "streamed": 1, "malformed": 3}
EXPECTED = {
    "small": {200, 503},
    "large": {200, 503},
    "larger": {200, 503},
    "oversized": {413},
    "streamed": {413},
    "malformed": {422},
}
MALFORMED = [
    b'{"token_ids": [[1, 2',  # cut short
    b'{"token_ids": [["a", "b"]]}',  # not integers
    b'{"token_ids": [[1, 2, 3], [4, 5]]}',  # ragged
    b'{"token_ids": [[1000]]}',  # past the vocabulary
    b"[1, 2, 3]",  # not an object
    b"\xff\xfe",  # not UTF-8
]


@dataclass
class LoadRequest:
    """One request of the load test and what became of it."""

    kind: str
    body: bytes
    rows: list[list[int]] | None = None  # of a valid request
    status: int | None = None
    retry_after: str | None = None
    answer: Any = None
    error: str | None = None  # a reset, a timeout: what must not happen


def load_requests() -> list[LoadRequest]:
    """The load test's requests, in a fixed, shuffled order."""
    rng = random.Random(13)
    valid = {
        "small": [token_ids(*SMALL, seed=seed) for seed in range(4)],
        "large": [token_ids(*LARGE, seed=seed) for seed in range(2)],
        "larger": [token_ids(154, 128, seed=2)],  # 154 sequences: about 97 kB of JSON
    }
    oversized = json.dumps({"token_ids": token_ids(320, 200, seed=3)}).encode()  # about 310 kB
    kinds = rng.choices(list(LOAD_MIX), weights=list(LOAD_MIX.values()), k=LOAD_REQUESTS)
    exchanges = []
    for kind in kinds:
        if kind in valid:
            rows = rng.choice(valid[kind])
            exchanges.append(LoadRequest(kind, json.dumps({"token_ids": rows}).encode(), rows))
        elif kind == "malformed":
            exchanges.append(LoadRequest(kind, rng.choice(MALFORMED)))
        else:
            exchanges.append(LoadRequest(kind, oversized))
    return exchanges


def post(service: Service, exchange: LoadRequest) -> None:
    """POST the exchange's body to /predict (chunked when streamed) and keep what came back."""
    host, port = service.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=LOAD_TIMEOUT_S)
    headers = {"Content-Type": "application/json"}
    body = exchange.body
    try:
        if exchange.kind == "streamed":
            chunks = (body[i : i + 2**16] for i in range(0, len(body), 2**16))
            connection.request("POST", "/predict", chunks, headers, encode_chunked=True)
        else:
            connection.request("POST", "/predict", body, headers)
        response = connection.getresponse()
        exchange.status = response.status
        exchange.retry_after = response.getheader("Retry-After")
        exchange.answer = json.loads(response.read())
    except (OSError, http.client.HTTPException, ValueError) as exc:
        exchange.error = f"{type(exc).__name__}: {exc}"
    finally:
        connection.close()


def refused_count(service: Service, reason: str) -> float:
    """torchmemguard_requests_refused_total for ``reason``, from the service's /metrics."""
    for family in text_string_to_metric_families(get_text(f"{service.url}/metrics")):
        for sample in family.samples:
            if sample.name == "torchmemguard_requests_refused_total" and sample.labels == {
                "reason": reason
            }:
                return sample.value
    raise AssertionError(f"no torchmemguard_requests_refused_total{{reason={reason!r}}}")


@pytest.fixture(scope="module")
def loaded_service(servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with start_service(servers, tmp_path_factory, "loaded service", *LOAD_FLAGS) as service:
        yield service


def test_service_under_load_answers_200_413_422_or_503_and_counts_its_refusals(
    loaded_service: Service, servers: Servers, reference_model: torch.nn.Module
) -> None:
    service = loaded_service
    reasons = ("body_too_large", "out_of_memory", "no_room")
    before = {reason: refused_count(service, reason) for reason in reasons}
    ooms_before = guard_count(service, "oom")
    exchanges = load_requests()
    with ThreadPoolExecutor(max_workers=LOAD_CLIENTS) as clients:
        list(clients.map(lambda exchange: post(service, exchange), exchanges))

    failed = [(e.kind, e.error) for e in exchanges if e.error is not None]
    assert not failed, f"{len(failed)} requests got no answer: {failed[:5]}\n{servers.report()}"
    unexpected = [
        (e.kind, e.status, e.answer) for e in exchanges if e.status not in EXPECTED[e.kind]
    ]
    assert not unexpected, f"{unexpected[:5]}\n{servers.report()}"
    assert not service.server.exited(), servers.report()
    status, health = request_json(f"{service.url}/healthz", timeout=10)
    assert (status, health["status"]) == (200, "ok"), health
    log = service.server.log.read_text(errors="replace")
    assert "Exception in ASGI application" not in log, servers.report()

    references: dict[int, torch.Tensor] = {}  # by the rows' identity: 7 sets of rows in all
    for exchange in [e for e in exchanges if e.status == 200]:
        assert exchange.rows is not None
        key = id(exchange.rows)
        if key not in references:
            references[key] = reference(reference_model, exchange.rows)
        expected = references[key]
        logits = torch.tensor(exchange.answer["logits"])
        assert torch.allclose(logits, expected, rtol=RTOL, atol=ATOL), exchange.kind

    shed = [e for e in exchanges if e.status == 503]
    assert all(e.retry_after == "1" for e in shed), [e.answer for e in shed]
    seen = {
        "body_too_large": sum(e.status == 413 for e in exchanges),
        "out_of_memory": sum(e.answer["detail"].startswith("Out of memory") for e in shed),
        "no_room": sum(e.answer["detail"].startswith("No room") for e in shed),
    }
    counted = {reason: refused_count(service, reason) - before[reason] for reason in reasons}
    assert counted == seen, f"metrics {counted}, responses {seen}"
    assert sum(seen.values()) == sum(e.status in (413, 503) for e in exchanges)
    assert guard_count(service, "oom") > ooms_before, "the load never ran out of memory"
