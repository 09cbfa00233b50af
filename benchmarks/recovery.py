"""Recovery under a real memory cap: torchmemguard and its peers on one stream of requests.

A small transformer encoder (one layer, width 32, one head, ReLU) answers 200 requests:
batch sizes log-uniform in 1..1024, lengths of 32, 64, 128, 256 or 512 tokens,
from a fixed seed. The same stream goes through six contenders:

- no guard: the model called as is; a request that does not fit fails;
- accelerate's ``find_executable_batch_size``, decorated once for the stream;
- toma's ``toma.execute.chunked``, filling a preallocated answer;
- torch-max-mem's ``maximize_memory_utilization``, decorated once for the
  stream on a function that runs the request in chunks of its ``batch_size``
  parameter, under ``infer_maximum_batch_size``, which starts ``batch_size`` at
  the request's length. After each error it takes for an OOM it halves
  ``batch_size`` (above 32, floored to a multiple of 32) and calls again; with
  ``keys="request"`` it caches the size a call ended with per request shape
  (and dtype and device), and never exceeds it for that shape again. It takes
  an error for an OOM when it is a ``torch.OutOfMemoryError`` (CUDA's, and so
  the GPU cap below) or a ``RuntimeError`` whose message holds one of the texts
  it lists. The CPU allocator's under ``RLIMIT_AS`` on Linux (``DefaultCPUAllocator:
  can't allocate memory``) is not among them: on the CPU it re-raises the first
  OOM of a request, so the requests that do not fit whole fail, as without a
  guard, and count as failed;
- torchmemguard's ``guard(model)``, default options;
- an oracle that runs every length in chunks of the largest size that holds
  for the whole stream, found beforehand: first the largest that fits with
  1 MiB to spare, by bisection under the same cap; then, in streams of the
  oracle alone, each fresh, the first OOM of a stream ends it and shrinks
  its length's chunk by 10%, until three streams in a row run without one
  (``held_chunks``). On the CPU each length
  is bisected in a fork of the oracle's warmed-up process: probing past the
  cap can leave glibc's heap fragmented, so the process that serves the
  stream never does.

On the CPU the cap is ``RLIMIT_AS`` at the address space a child holds after its
warm-up, plus 16 MiB; from the middle of the stream on, plus 32 MiB, and the
oracle switches to the chunks it found for the larger cap. With a GPU
(``torch.cuda.is_available()``) the cap is a ``torchmemguard.memory_budget`` in
bytes on the device instead: what is reserved after the warm-up, plus half of
what the largest 32-token request takes whole (doubled half-way, likewise); the
results then go to ``results/recovery-gpu.json``.

How the contenders are interleaved. Each runs in a process of its own: under a
cap, what a process has mapped, cached or fragmented depends on everything it
ran before, and a few hundred KiB decide whether a chunk fits, so contenders
sharing one process would inherit each other's memory state (and would have to
keep apart their own memories: accelerate's batch size, toma's step cache,
torch-max-mem's sizes per shape). But this machine's speed drifts by 10% and
more over seconds, so contenders run one after another would be timed at
different speeds. So each run starts a fresh, identically set-up process per
contender, and the parent hands out turns request by request: request i goes to
every contender in turn, one process working at a time, the order rotating with
i. Every child runs one thread, with oneDNN off
and glibc's defaults, as a user's process runs (``--tuned``: with
``MALLOC_MMAP_THRESHOLD_=65536``, so that the address space follows the tensors
held; results in ``results/recovery-tuned.json``), and calls ``gc.freeze()``
after its warm-up, so that the full
collections that accelerate (before every call) and toma (after every chunk)
run cost what they cost in a lean service; the report says what they would
cost without it.

Each child reports, per request, the wall time of the contender's call; every
chunk the model received, how it ended and how long it took; and whether the
answer equals the reference, computed beforehand without a cap in chunks of at
most 8192 tokens (``torch.allclose`` with rtol = atol = 1e-5, and bitwise).
Medians over runs, with the interquartile range.

    python -m benchmarks.recovery [--runs 3] [--requests 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from benchmarks.recovery_child import FEEDFORWARD, HEADS, LENGTHS, RTOL, WIDTH, make_requests
from benchmarks.results import ROOT, child_environment, save, summary

CONTENDERS = ("none", "accelerate", "toma", "torch-max-mem", "torchmemguard", "oracle")
LABELS = {
    "none": "no guard",
    "accelerate": "accelerate `find_executable_batch_size`",
    "toma": "toma `execute.chunked`",
    "torch-max-mem": "torch-max-mem `maximize_memory_utilization`",
    "torchmemguard": "torchmemguard `guard(model)`",
    "oracle": "oracle",
}
CHILD_TIMEOUT_S = 300
REACHED = 0.9  # a chunk is back at the new optimum from this share of it on
ORACLE_SHRINK = 0.9  # an oracle's chunk after an OOM while it calibrates, as a share of before
Shape = tuple[int, int]  # (batch, length)
Run = dict[str, Any]  # what one child reported, with its per-request records


class Child:
    """A child process (``benchmarks.recovery_child``) and the lines it writes."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        self.name = f"{config['task']}-{config.get('contender', '')}-{config.get('run', '')}"
        self.output = workdir / f"{self.name}.result.json"
        path = workdir / f"{self.name}.json"
        path.write_text(json.dumps({**config, "output": str(self.output)}))
        env = child_environment(bool(config.get("tuned")))
        self.stderr = (workdir / f"{self.name}.stderr").open("w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.recovery_child", str(path)],
            cwd=ROOT, env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
        )  # fmt: skip
        self.watchdog = threading.Timer(CHILD_TIMEOUT_S, self.process.kill)
        self.watchdog.daemon = True
        self.watchdog.start()

    def expect(self, kind: str) -> str:
        """The rest of the next line, which must start with ``kind``."""
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        found, _, rest = line.strip().partition(" ")
        if found != kind:
            self.kill()
            self.stderr.seek(0)
            raise RuntimeError(
                f"child {self.name} wrote {line[:200]!r}, not {kind!r}; "
                f"status {self.process.returncode}; stderr:\n{self.stderr.read()[-4000:]}"
            )
        return rest

    def turn(self) -> dict[str, Any]:
        """Let the child serve its next request; what happened to it."""
        assert self.process.stdin is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        record: dict[str, Any] = json.loads(self.expect("request"))
        return record

    def kill(self) -> None:
        """End the child now (after a failure elsewhere)."""
        self.watchdog.cancel()
        self.process.kill()
        self.process.wait()

    def finish(self) -> dict[str, Any]:
        """Wait for the child to end; its summary."""
        code = self.process.wait()
        self.watchdog.cancel()
        self.stderr.seek(0)
        errors = self.stderr.read()
        self.stderr.close()
        if code != 0:
            raise RuntimeError(f"child {self.name} exited with status {code}:\n{errors[-4000:]}")
        result: dict[str, Any] = json.loads(self.output.read_text())
        return result


def serve(config: dict[str, Any], run: int, workdir: Path, bar: tqdm) -> dict[str, Run]:
    """One run: a fresh child per contender, taking turns request by request."""
    children = {
        name: Child({**config, "task": "serve", "contender": name, "run": run}, workdir)
        for name in CONTENDERS
    }
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in CONTENDERS}
    try:
        for child in children.values():
            child.expect("ready")
        for index in range(config["requests"]):
            # The order of the turns rotates, so that every contender goes first as often.
            shift = (index + run) % len(CONTENDERS)
            for name in CONTENDERS[shift:] + CONTENDERS[:shift]:
                records[name].append(children[name].turn())
                bar.update()
        return {name: {**c.finish(), "requests": records[name]} for name, c in children.items()}
    except BaseException:
        for child in children.values():
            child.kill()
        raise


def held_chunks(config: dict[str, Any], workdir: Path, shapes: list[Shape]) -> tuple[Any, int]:
    """The oracle's chunks per phase and length, and the streams it took to find them.

    The first stream bisects each length (``largest_fitting_chunk``). A stream
    ends at its first OOM, which shrinks that phase and length's chunk by
    ORACLE_SHRINK for the next, fresh stream. The chunks are those that then
    ran three fresh streams in a row without one: with glibc's defaults what
    fits depends on the heap's history, so sizes that fit a fresh fork can fail
    later in the stream, and a process that ran out of memory once has a
    heap that no longer tells.
    """
    chunks: Any = None
    streams = clean = 0
    switch = len(shapes) // 2
    while clean < 3:
        streams += 1
        calibration = {"task": "serve", "contender": "oracle", "run": f"calibration{streams}"}
        child = Child({**config, **calibration, "chunks": chunks}, workdir)
        failed = None
        try:
            found = json.loads(child.expect("ready"))
            chunks = chunks or found
            for index in range(config["requests"]):
                record = child.turn()
                if record["error"] is not None:
                    failed = index
                    break
        finally:
            child.kill()
        if failed is None:
            clean += 1
            continue
        if not any(outcome == "oom" for _, outcome, _ in record["calls"]):
            raise RuntimeError(f"the oracle failed request {failed}: {record['error']}")
        clean = 0
        phase, length = str(int(failed >= switch) + 1), str(shapes[failed][1])
        chunks[phase][length] = max(1, int(chunks[phase][length] * ORACLE_SHRINK))
    return chunks, streams


# ---------------------------------------------------------------------------
# What the runs did


def tally(run: Run, shapes: list[Shape]) -> dict[str, Any]:
    """Times, tokens answered, OOMs, failures and wrong answers of one run, by phase."""
    switch = len(shapes) // 2
    time_s, tokens, model_s = [0.0, 0.0], [0, 0], [0.0, 0.0]
    ooms = other_errors = failed = wrong = identical = 0
    max_diff = 0.0
    seen: set[int] = set()
    seen_ooms = []
    requests = run["requests"]
    for index, (record, (batch, length)) in enumerate(zip(requests, shapes, strict=True)):
        phase = int(index >= switch)
        time_s[phase] += record["s"]
        oom_sizes = [size for size, outcome, _ in record["calls"] if outcome == "oom"]
        ooms += len(oom_sizes)
        other_errors += sum(outcome not in ("ok", "oom") for _, outcome, _ in record["calls"])
        for _, outcome, seconds in record["calls"]:
            model_s[outcome != "ok"] += seconds
        if oom_sizes and length in seen:
            limit = requests[index - 1].get("learned", {}).get(str(length))
            seen_ooms.append(
                {
                    "request": index,
                    "batch": batch,
                    "length": length,
                    "failed": oom_sizes,
                    "cause": _cause(oom_sizes[0], limit) if "learned" in record else None,
                }
            )
        seen.add(length)
        if record["error"] is not None:
            failed += 1
            continue
        tokens[phase] += batch * length
        wrong += not record["equal"]
        identical += record["identical"]
        max_diff = max(max_diff, record["diff"])
    return {
        "time_s": sum(time_s),
        "phase_time_s": time_s,
        "model_fitted_s": model_s[0],
        "model_failed_s": model_s[1],
        "outside_model_s": sum(time_s) - sum(model_s),
        "tokens": sum(tokens),
        "phase_tokens": tokens,
        "ooms": ooms,
        "ooms_on_seen_lengths": sum(len(o["failed"]) for o in seen_ooms),
        "seen_ooms": seen_ooms,
        "other_errors": other_errors,
        "failed": failed,
        "answered": len(shapes) - failed,
        "wrong": wrong,
        "identical": identical,
        "max_diff": max_diff,
        "model_calls": sum(len(r["calls"]) for r in requests),
    }


def _cause(size: int, limit: int | None) -> str:
    """Why torchmemguard tried a chunk of ``size`` that failed, given its limit before."""
    if limit is None:
        return "no limit learned for this length yet: first chunk scaled from another length"
    if size > limit:
        return f"growth probe: {size} tried above the limit {limit}"
    return f"the learned limit {limit} no longer fits"


def largest_chunk(record: dict[str, Any]) -> int | None:
    """The largest chunk the model ran to the end for one request."""
    return max((size for size, outcome, _ in record["calls"] if outcome == "ok"), default=None)


def chunk_in_force(run: Run, shapes: list[Shape], length: int, phase: int) -> str:
    """The chunk a contender used for ``length`` at the end of ``phase`` (0 or 1)."""
    switch = len(shapes) // 2
    indices = range(switch) if phase == 0 else range(switch, len(shapes))
    requests = run["requests"]
    if "learned" in requests[0]:
        limit = requests[indices[-1]]["learned"].get(str(length))
        return "none" if limit is None else str(limit)
    if run["optimum"]:
        return str(run["optimum"][str(phase + 1)][str(length)])
    for index in reversed(indices):
        if shapes[index][1] == length and len(requests[index]["calls"]) > 1:
            return str(largest_chunk(requests[index]))
    return "whole"


def regrowth(
    guarded: Run, optimum: dict[str, int], shapes: list[Shape], length: int
) -> dict[str, Any]:
    """How torchmemguard's limit for ``length`` grew back in phase 2, towards ``optimum``.

    ``requests``: the phase-2 requests of that length until the limit reached
    REACHED of the new optimum (None if it did not); ``held_back``: how many of
    them the limit held back, the only calls on which the limit can grow.
    """
    switch = len(shapes) // 2
    target = REACHED * optimum[str(length)]
    limit = guarded["requests"][switch - 1]["learned"].get(str(length))
    found: dict[str, Any] = {"requests": None, "target": target, "held_back": 0, "seen": 0}
    if limit is None:
        return {**found, "limit": None, "requests": "no limit learned"}
    for index in range(switch, len(shapes)):
        if limit >= target:
            found["requests"] = found["seen"]
            break
        batch, n = shapes[index]
        if n == length:
            found["seen"] += 1
            found["held_back"] += batch > limit
            limit = guarded["requests"][index]["learned"][str(length)]
    else:
        if limit >= target:
            found["requests"] = found["seen"]
    found["limit"] = limit
    return found


# ---------------------------------------------------------------------------
# The report


def _spread(values: list[float], form: str) -> str:
    s = summary(values)
    return f"{s['median']:{form}} [{s['q1']:{form}}, {s['q3']:{form}}]"


def _count(values: list[int]) -> str:
    middle = statistics.median_low(values)
    return str(middle) if len(set(values)) == 1 else f"{middle} ({', '.join(map(str, values))})"


def _values(values: list[Any]) -> str:
    """One value, or the value of each run."""
    return str(values[0]) if len(set(values)) == 1 else "/".join(map(str, values))


def _throughput(totals: dict[str, Any], phase: int | None = None) -> float:
    if phase is None:
        return float(totals["tokens"]) / totals["time_s"]
    return float(totals["phase_tokens"][phase]) / totals["phase_time_s"][phase]


def _equal(totals: list[dict[str, Any]]) -> str:
    answered = sum(t["answered"] for t in totals)
    wrong = sum(t["wrong"] for t in totals)
    if wrong:
        return f"{answered - wrong} of {answered} answers"
    if all(t["identical"] == t["answered"] for t in totals):
        return f"all {answered} answers, bitwise"
    return f"all {answered} answers (largest difference {max(t['max_diff'] for t in totals):.1e})"


def _results_table(tallies: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = [
        "| contender | throughput vs oracle | phase 1 | phase 2 | stream time (s) | OOMs raised "
        "| OOMs on lengths already seen | failed requests | equal to the reference |",
        "| --- " * 9 + "|",
    ]
    oracle = tallies["oracle"]
    for name, totals in tallies.items():
        pairs = list(zip(totals, oracle, strict=True))
        ratios = [
            [_throughput(t, phase) / _throughput(o, phase) for t, o in pairs]
            for phase in (None, 0, 1)
        ]
        cells = [LABELS[name], *(_spread(r, ".1%") for r in ratios)]
        cells.append(_spread([t["time_s"] for t in totals], ".2f"))
        cells += [_count([t[key] for t in totals]) for key in ("ooms", "ooms_on_seen_lengths")]
        cells += [_count([t["failed"] for t in totals]), _equal(totals)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _time_table(tallies: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = [
        "| contender | in the model, on chunks that fitted | in the model, on chunks that ran "
        "out of memory | outside the model: the contender's own work |",
        "| --- " * 4 + "|",
    ]
    for name, totals in tallies.items():
        keys = ("model_fitted_s", "model_failed_s", "outside_model_s")
        cells = [f"{statistics.median(t[key] for t in totals):.2f}" for key in keys]
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    return lines


def _chunk_table(shapes: list[Shape], runs: dict[str, list[Run]]) -> list[str]:
    switch = len(shapes) // 2
    lines = [
        "| length | requests | largest batch | oracle optimum | torchmemguard limit | accelerate "
        f"| toma | torch-max-mem | torchmemguard: phase-2 requests until its limit is >= "
        f"{REACHED:.0%} of the new optimum |",
        "| --- " * 9 + "|",
    ]
    for length in sorted({n for _, n in shapes}):
        count = [sum(n == length for _, n in part) for part in (shapes[:switch], shapes[switch:])]
        cells = [str(length), f"{count[0]} + {count[1]}"]
        cells.append(str(max(b for b, n in shapes if n == length)))
        for name in ("oracle", "torchmemguard", "accelerate", "toma", "torch-max-mem"):
            ends = [chunk_in_force(runs[name][0], shapes, length, phase) for phase in (0, 1)]
            cells.append(" -> ".join(ends))
        found = [
            regrowth(g, o["optimum"]["2"], shapes, length)
            for g, o in zip(runs["torchmemguard"], runs["oracle"], strict=True)
        ]
        if all(f["requests"] is None for f in found):
            cells.append(
                f"not within the phase: limit {_values([f['limit'] for f in found])} at its end, "
                f"{_values([round(f['target']) for f in found])} needed; "
                f"{_values([f['held_back'] for f in found])} of its {found[0]['seen']} requests "
                "held back by the limit"
            )
        else:
            cells.append(_values([f["requests"] for f in found]))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _seen_table(tallies: dict[str, list[dict[str, Any]]]) -> list[str]:
    rows = [(i + 1, o) for i, t in enumerate(tallies["torchmemguard"]) for o in t["seen_ooms"]]
    lines = ["| run | request | batch, length | chunks that failed | cause |", "| --- " * 5 + "|"]
    lines += [
        f"| {i} | {o['request']} | {o['batch']}, {o['length']} "
        f"| {', '.join(map(str, o['failed']))} | {o['cause']} |"
        for i, o in rows
    ]
    return lines if rows else [*lines, "| none, in any run | | | | |"]


def _torch_max_mem_note(device: str, results: list[Run]) -> str:
    """What torch-max-mem did with the requests that ran out of memory, over all runs."""
    hit = retried = answered = 0
    for run in results:
        for record in run["requests"]:
            outcomes = [outcome for _, outcome, _ in record["calls"]]
            if "oom" not in outcomes:
                continue
            hit += 1
            retried += len(outcomes) > outcomes.index("oom") + 1
            answered += record["error"] is None
    text = (
        f"torch-max-mem: {hit} requests ran out of memory, over all runs; it retried {retried} "
        f"of them with a smaller `batch_size`, and answered {answered}."
    )
    if device == "cpu" and hit and not retried:
        text += (
            " It re-raised every out-of-memory error of the CPU: it takes an error for one when "
            "it is a `torch.OutOfMemoryError`, or a `RuntimeError` whose message holds one of "
            "the texts it lists, and the CPU allocator's message under `RLIMIT_AS` on Linux, "
            "`DefaultCPUAllocator: can't allocate memory`, is not among them (the list has "
            "`DefaultCPUAllocator: not enough memory`, the Windows build's). Its failed requests "
            "are those that do not fit whole, as without a guard."
        )
    return text


def markdown(setup: dict[str, Any], shapes: list[Shape], runs: dict[str, list[Run]]) -> str:
    """The result tables, in Markdown."""
    switch = len(shapes) // 2
    first, second = (h / 2**20 for h in setup["headroom_bytes"])
    tallies = {name: [tally(r, shapes) for r in results] for name, results in runs.items()}
    if setup["device"] == "cuda":
        cap = "a `memory_budget` on the GPU at the memory reserved after warm-up"
    else:
        cap = "`RLIMIT_AS` at its address space after warm-up"
    guard, oracle = tallies["torchmemguard"], tallies["oracle"]
    pairs = zip(guard, oracle, strict=True)
    ratio = statistics.median(_throughput(t) / _throughput(o) for t, o in pairs)
    regrown = [
        regrowth(g, o["optimum"]["2"], shapes, length)["requests"]
        for g, o in zip(runs["torchmemguard"], runs["oracle"], strict=True)
        for length in {n for _, n in shapes}
    ]
    targets = [
        (f"throughput at least 95% of the oracle's ({ratio:.1%})", ratio >= 0.95),
        ("no failed request", all(t["failed"] == 0 for t in guard)),
        ("no OOM on a length already seen", all(t["ooms_on_seen_lengths"] == 0 for t in guard)),
        ("at most 1 OOM per stream (one device and dtype)", all(t["ooms"] <= 1 for t in guard)),
        (
            f"after the raise, every limit at {REACHED:.0%} of the new optimum within 10 "
            "requests of its length",
            all(r == "no limit learned" or (r is not None and r <= 10) for r in regrown),
        ),
        ("every answer equal to the reference", all(t["wrong"] == 0 for t in guard)),
    ]
    collect_ms = setup["gc_collect_s"] * 1e3
    chunks = statistics.median(t["model_calls"] for t in tallies["toma"])
    calls = statistics.median(len(shapes) + t["ooms"] for t in tallies["accelerate"])
    lines = [
        f"### Recovery under a real memory cap ({setup['device']})",
        "",
        f"{len(shapes)} requests (batch sizes log-uniform in 1..1024, lengths "
        f"{', '.join(map(str, LENGTHS))} tokens, seed {setup['seed']}) through a "
        f"{setup['model']}, one thread, in a process capped by {cap} + {first:.0f} MiB; "
        f"from request {switch} on, + {second:.0f} MiB (phase 2). {setup['runs']} runs; in each, "
        "a fresh process per contender, the processes taking turns request by request in a "
        "rotating order. Medians over runs, with the quartiles in brackets.",
        "",
        *_results_table(tallies),
        "",
        "Throughput: tokens of the answered requests per second of the whole stream, relative to "
        "the oracle in the same run (failed requests count their time but not their tokens). "
        "OOMs: out-of-memory errors the model raised, per stream (each run in parentheses when "
        "runs differ); on lengths already seen: those raised during requests of a length that "
        f"an earlier request had. Equal: `torch.allclose(rtol={RTOL}, atol={RTOL})` against the "
        "reference, over all runs.",
        "",
        "torchmemguard's targets: "
        + "; ".join(f"{what}: {'met' if met else 'MISSED'}" for what, met in targets)
        + ".",
        "",
        *(
            [_torch_max_mem_note(setup["device"], runs["torch-max-mem"]), ""]
            if "torch-max-mem" in runs
            else []
        ),
        "#### Where the time of a stream went (seconds, medians)",
        "",
        *_time_table(tallies),
        "",
        f"A full `gc.collect()` takes {collect_ms:.0f} ms in a process set up like these, "
        f"without `gc.freeze()`. toma collects after each chunk ({chunks:.0f} per stream), "
        f"accelerate before each call and after each OOM ({calls:.0f} times): without the "
        f"freeze, about {chunks * collect_ms / 1e3:.0f} s and {calls * collect_ms / 1e3:.0f} s "
        "more per stream.",
        "",
        "#### Chunk sizes per length, at the end of phase 1 -> of phase 2 (run 1)",
        "",
        *_chunk_table(shapes, runs),
        "",
        "Values that differ between runs are given per run, separated by /.",
        "",
        "#### torchmemguard: OOMs on lengths already seen",
        "",
        *_seen_table(tallies),
    ]
    return "\n".join(lines) + "\n"


def plot(shapes: list[Shape], runs: dict[str, list[Run]]) -> dict[str, Any]:
    """Series per request, for ``benchmarks.report``: each mapping is drawn as a panel."""
    switch = len(shapes) // 2
    optimum = runs["oracle"][0]["optimum"]
    cumulative = {}
    for name, results in runs.items():
        series = []
        for run in results:
            total, sums = 0.0, []
            for record in run["requests"]:
                total += record["s"]
                sums.append(total)
            series.append(sums)
        cumulative[name] = [statistics.median(values) for values in zip(*series, strict=True)]
    chunks: dict[str, list[int | None]] = {
        name: [largest_chunk(r) for r in runs[name][0]["requests"]]
        for name in ("accelerate", "toma", "torch-max-mem", "torchmemguard", "oracle")
    }
    guarded = runs["torchmemguard"][0]["requests"]
    chunks["torchmemguard limit"] = [
        r["learned"].get(str(n)) for r, (_, n) in zip(guarded, shapes, strict=True)
    ]
    chunks["oracle optimum"] = [
        optimum[str(int(i >= switch) + 1)][str(n)] for i, (_, n) in enumerate(shapes)
    ]
    return {
        "seconds since the stream began (median over runs)": cumulative,
        "largest chunk of each request, in sequences (run 1)": chunks,
        "batch": [b for b, _ in shapes],
        "length": [n for _, n in shapes],
        "cap_raised_before": switch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of every contender")
    parser.add_argument("--requests", type=int, default=200, help="requests in the stream")
    parser.add_argument(
        "--tuned", action="store_true", help="children with glibc's mmap threshold at 64 KiB"
    )
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    seed = 0
    shapes: list[Shape] = [(len(r), r.shape[1]) for r in make_requests(args.requests, seed)]
    runs: dict[str, list[Run]] = {name: [] for name in CONTENDERS}
    started = time.perf_counter()
    with (
        tempfile.TemporaryDirectory() as tmp,
        tqdm(total=(len(CONTENDERS) * args.runs + 1) * args.requests, unit="request") as bar,
    ):
        workdir = Path(tmp)
        config = {"device": device, "requests": args.requests, "seed": seed, "tuned": args.tuned}
        config["references"] = str(workdir / "references.pt")
        bar.set_description("references")
        child = Child({**config, "task": "reference"}, workdir)
        for _ in range(args.requests):
            child.expect("request")
            bar.update()
        reference = child.finish()
        config["headroom"] = reference["headroom"]
        bar.set_description("oracle's chunks")
        config["chunks"], streams = held_chunks(config, workdir, shapes)
        for run in range(args.runs):
            bar.set_description(f"run {run + 1}/{args.runs}")
            for name, result in serve(config, run, workdir, bar).items():
                runs[name].append(result)
    setup = {
        "device": device,
        "model": f"transformer encoder (1 layer, width {WIDTH}, attention heads {HEADS}, "
        f"feed-forward {FEEDFORWARD}, ReLU)",
        "requests": args.requests,
        "lengths": list(LENGTHS),
        "seed": seed,
        "runs": args.runs,
        "child_threads": 1,
        "allocator": "MALLOC_MMAP_THRESHOLD_=65536" if args.tuned else "glibc's defaults",
        "headroom_bytes": [config["headroom"], 2 * config["headroom"]],
        "gc_collect_s": reference["gc_collect_s"],
        "cap_raised_before_request": args.requests // 2,
        "oracle_calibration_streams": streams,
        "tolerance": {"rtol": RTOL, "atol": RTOL},
        "turns": "contenders take turns request by request; request i of run r starts "
        f"with contender (i + r) mod {len(CONTENDERS)} of " + ", ".join(CONTENDERS),
        "wall_s": time.perf_counter() - started,
    }
    table = markdown(setup, shapes, runs)
    memory_keys = ("base_bytes", "stream_base_bytes", "stream_end_bytes", "optimum")
    path = save(
        "recovery-gpu" if device == "cuda" else "recovery-tuned" if args.tuned else "recovery",
        {
            "setup": setup,
            "runs": {name: [tally(r, shapes) for r in results] for name, results in runs.items()},
            "memory": {
                name: [{k: r[k] for k in memory_keys} for r in rs] for name, rs in runs.items()
            },
            "guard_stats": [r["guard_stats"] for r in runs["torchmemguard"]],
            "markdown": table,
            "plot": plot(shapes, runs),
        },
    )
    print(table)
    print(f"Wall time: {setup['wall_s']:.0f} s. Results: {path}")


if __name__ == "__main__":
    main()
