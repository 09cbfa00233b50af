"""Training under a real memory cap: torchmemguard's accumulate_gradients, accelerate, an oracle.

An MLP (64 -> 1024 -> 1024 -> 10, float32) trains for ``--steps`` steps of SGD
on batches of ``--batch`` samples, from a fixed seed, in a child process whose
address space is capped (``RLIMIT_AS``) at what it holds after its warm-up plus
``--headroom`` MiB: too little for a whole batch, so every contender has to
accumulate gradients over micro-batches. The contenders:

- an oracle: micro-batches of a fixed size, the largest that runs every step
  (the checks between steps included) in each of three fresh processes, found
  beforehand by bisection;
- accelerate's ``find_executable_batch_size``, as its documentation shows:
  decorated once, the decorated function runs one step with micro-batches of
  its ``batch_size`` (zeroing the gradients first, so that a step that ran out
  of memory starts again clean); after an out-of-memory error accelerate runs
  ``gc.collect()``, empties the cache and retries with 90% of the size, which
  it keeps for later calls;
- torchmemguard's ``accumulate_gradients``, default options.

Each contender runs in a fresh process per run, the order rotating from run to
run; every child runs one thread, with oneDNN off and glibc's defaults, as a
user's process runs. Each step's
gradients are compared with a reference computed beforehand without a cap on
whole batches (``torch.allclose``, rtol 1e-4, atol 1e-6); a contender's
parameters then take the reference's next values, so that a wrong step cannot
hide in later ones. Steps per second are over the steps after the first;
the figures are medians over runs.

    python -m benchmarks.training [--runs 3] [--steps 20] [--batch 2048] [--headroom 24]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.results import address_space, child_environment, environment, save

CONTENDERS = ("oracle", "accelerate", "torchmemguard")
TARGET = 0.95  # of the oracle's steps per second
MIB = 2**20


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 10),
    )


def batches(steps: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(size, 64, generator=generator),
            torch.randint(0, 10, (size,), generator=generator),
        )
        for _ in range(steps)
    ]


def flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])  # type: ignore[union-attr]


def reference(steps: int, size: int) -> dict[str, list[torch.Tensor]]:
    """Whole-batch gradients and the parameters after each step, without a cap."""
    model = build_model()
    grads, params = [], []
    for x, y in batches(steps, size):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads.append(flat_grad(model))
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.05 * p.grad  # type: ignore[operator]
        params.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    return {"grads": grads, "params": params}


def micro_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, micro: int) -> None:
    """One step accumulated over micro-batches of ``micro`` samples, by hand."""
    n = len(x)
    for begin in range(0, n, micro):
        xs, ys = x[begin : begin + micro], y[begin : begin + micro]
        (F.cross_entropy(model(xs), ys) * (len(xs) / n)).backward()


# The child: one contender under the cap.


def child(config: dict[str, Any]) -> dict[str, Any]:
    import resource

    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False  # type: ignore[assignment]
    model = build_model()
    data = batches(config["steps"], config["batch"])
    ref = torch.load(config["reference"]) if config.get("reference") else None
    name = config["contender"]
    ooms = [0]
    micro: list[int] = []  # torchmemguard's micro-batch size after each step
    if name == "accelerate":
        from accelerate.utils import find_executable_batch_size  # type: ignore[import-untyped]

        current: dict[str, Any] = {}

        @find_executable_batch_size(starting_batch_size=config["batch"])  # type: ignore[untyped-decorator]
        def accelerate_step(batch_size: int) -> None:
            current["calls"] += 1
            model.zero_grad(set_to_none=True)
            micro_step(model, current["x"], current["y"], batch_size)

        def run(x: torch.Tensor, y: torch.Tensor) -> None:
            current.update(x=x, y=y, calls=0)
            accelerate_step()
            ooms[0] += current["calls"] - 1

    elif name == "torchmemguard":
        import torchmemguard

        step = torchmemguard.accumulate_gradients(model, lambda x, y: F.cross_entropy(model(x), y))

        def run(x: torch.Tensor, y: torch.Tensor) -> None:
            step(x, y)
            ooms[0] = step.oom_guard.stats.ooms  # type: ignore[attr-defined]
            micro.append(min(step.oom_guard.learned().values(), default=len(x)))  # type: ignore[attr-defined]

    else:
        fixed = int(name.partition(":")[2] or config["oracle"])

        def run(x: torch.Tensor, y: torch.Tensor) -> None:
            micro_step(model, x, y, fixed)

    # Warm up on a small batch, then cap the address space above what is held.
    micro_step(model, data[0][0][:8], data[0][1][:8], 8)
    model.zero_grad(set_to_none=True)
    gc.collect()
    gc.freeze()
    cap = address_space() + config["headroom"] * MIB
    capped = (cap, resource.RLIM_INFINITY)
    free = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
    times, right = [], []
    for i, (x, y) in enumerate(data):
        resource.setrlimit(resource.RLIMIT_AS, capped)
        started = time.perf_counter()
        try:
            run(x, y)
        except Exception as exc:
            error = f"{type(exc).__name__}: {str(exc)[:300]}"
            return {"ok": False, "error": error, "ooms": ooms[0]}
        finally:
            times.append(time.perf_counter() - started)
            resource.setrlimit(resource.RLIMIT_AS, free)  # the checks are not the contender's
        if ref is not None:
            grad = flat_grad(model)
            right.append(bool(torch.allclose(grad, ref["grads"][i], rtol=1e-4, atol=1e-6)))
            with torch.no_grad():  # continue from the reference's parameters
                offset = 0
                for p in model.parameters():
                    p.copy_(ref["params"][i][offset : offset + p.numel()].view_as(p))
                    offset += p.numel()
            del grad
        model.zero_grad(set_to_none=True)
    return {"ok": True, "seconds": times, "right": right, "ooms": ooms[0], "micro": micro}


# The parent.


def spawn(config: dict[str, Any], workdir: Path) -> dict[str, Any]:
    path = workdir / "config.json"
    path.write_text(json.dumps(config))
    env = {**child_environment(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.training", "--child", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    found: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    return found


def _holds(base: dict[str, Any], workdir: Path, micro: int) -> bool:
    """Whether micro-batches of ``micro`` run every step, checks included, in each of
    three fresh processes: with glibc's defaults, what fits depends on the heap's
    history, so one process that got through does not make an oracle."""
    probe = {**base, "contender": f"fixed:{micro}"}
    return all(spawn(probe, workdir)["ok"] for _ in range(3))


def largest_micro(base: dict[str, Any], workdir: Path) -> int:
    """The largest micro-batch that holds under the cap (``_holds``), by bisection."""
    low, high = 1, base["batch"] + 1  # low holds (one sample does); high: the first not known
    while high - low > 2:
        middle = (low + high) // 2
        if _holds(base, workdir, middle):
            low = middle
        else:
            high = middle
    return low


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--headroom", type=int, default=24, help="MiB above the warm-up")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        config = json.loads(Path(args.child).read_text())
        print("RESULT " + json.dumps(child(config)), flush=True)
        return
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        ref_path = workdir / "reference.pt"
        torch.save(reference(args.steps, args.batch), ref_path)
        base = {
            "steps": args.steps, "batch": args.batch, "headroom": args.headroom,
            "reference": str(ref_path),
        }  # fmt: skip
        oracle = largest_micro(base, workdir)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CONTENDERS}
        for run in range(args.runs):
            order = CONTENDERS[run % 3 :] + CONTENDERS[: run % 3]
            for name in order:
                runs[name].append(spawn({**base, "contender": name, "oracle": oracle}, workdir))
    results = summarise(runs, oracle, args)
    results["seconds"] = round(time.perf_counter() - started)
    results["markdown"] = markdown(results)
    path = save("training", results)
    print(results["markdown"])
    print(f"Wrote {path}.")


def summarise(runs: dict[str, list[dict[str, Any]]], oracle: int, args: Any) -> dict[str, Any]:
    rates: dict[str, list[float]] = {}
    rows: dict[str, Any] = {}
    for name, found in runs.items():
        finished = [run for run in found if run["ok"]]
        rates[name] = [(len(run["seconds"]) - 1) / sum(run["seconds"][1:]) for run in finished]
        rows[name] = {
            "runs": len(found),
            "finished": len(finished),
            "errors": [run["error"] for run in found if not run["ok"]],
            "steps_per_second": statistics.median(rates[name]) if rates[name] else None,
            "ooms": [run["ooms"] for run in found],
            "wrong_steps": [run["right"].count(False) for run in finished],
            "micro_batches": [run["micro"] for run in finished if run["micro"]][:1],
        }
    base = rows["oracle"]["steps_per_second"]
    for name, row in rows.items():
        ratios = [rate / base for rate in rates[name]] if base else []
        row["of_oracle"] = statistics.median(ratios) if ratios else None
    env = environment()
    return {
        "benchmark": "training",
        "summary_line": f"{env['cpu']}, 1 torch thread, torch {env['torch']}, "
        f"commit {env['git_commit']}",
        "runs": args.runs,
        "steps": args.steps,
        "batch": args.batch,
        "headroom_mib": args.headroom,
        "oracle_micro_batch": oracle,
        "target_of_oracle": TARGET,
        "contenders": rows,
    }


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"Training under a real cap ({results['summary_line']}): {results['steps']} SGD steps "
        f"of {results['batch']} samples, address space capped {results['headroom_mib']} MiB "
        f"above the warm-up; the oracle's micro-batch is {results['oracle_micro_batch']}. "
        f"Medians over {results['runs']} runs.",
        "",
        "| contender | steps/s | of the oracle | OOMs per run | wrong steps per run | finished |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in results["contenders"].items():
        rate = row["steps_per_second"]
        share = row["of_oracle"]
        lines.append(
            f"| {name} | {'—' if rate is None else f'{rate:.2f}'} | "
            f"{'—' if share is None else f'{share:.2f}'} | {row['ooms']} | "
            f"{row['wrong_steps']} | {row['finished']} of {row['runs']} |"
        )
        lines += [f"|  | error: {error} | | | | |" for error in row["errors"][:1]]
    mine = results["contenders"]["torchmemguard"]
    met = (
        mine["of_oracle"] is not None
        and mine["of_oracle"] >= TARGET
        and not any(mine["wrong_steps"])
        and mine["finished"] == mine["runs"]
    )
    lines += [
        "",
        f"Target: at least {TARGET} of the oracle's steps per second, no wrong gradient: "
        f"{'met' if met else 'NOT met'}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
