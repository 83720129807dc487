"""Server load benchmark: concurrent clients against one-at-a-time, and sustained load with a worker killed.

Default mode: the same requests sent one at a time, then by --clients threads at once. Concurrent
clients share the engines' batches (continuous batching across requests), so their throughput should
be well above the one-at-a-time baseline measured in the same run.

--duration D: --clients threads each send requests in a loop for D seconds (every request has a
time-out, --request-timeout), then stop by themselves. Counts requests sent, completed, failed (by
HTTP status or transport error) and lost (sent but neither completed nor failed when the run ends;
the target is none failed, none lost), p50/p99 latency and tokens/s. With --kill-worker-after S
(needs --dp >= 2) one engine worker process (its pid from /stats) gets SIGKILL S seconds in: /health
must report it, and the requests after it must fail fast (503) rather than hang; the server must
still stop on SIGTERM.

    python -m bench.load --shape tiny --clients 8 --requests 32 --prompts-per-request 2 --max-tokens 32
    python -m bench.load --shape tiny --clients 16 --duration 20
    python -m bench.load --shape tiny --dp 2 --clients 16 --duration 20 --kill-worker-after 8

Prints a table last and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from bench.shapes import SHAPES, model_config, write_checkpoint
from flywheel import GenerationClient
from flywheel.server.launch import ServerProcess

# A client whose request failed waits this long before the next, as a real client would back off.
FAILURE_BACKOFF_S = 0.05
HEALTH_POLL_S = 0.05


def make_requests(count: int, prompts_per_request: int, prompt_len: int, vocab: int, seed: int) -> list:
    rng = random.Random(seed)
    return [[[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(prompts_per_request)]
            for _ in range(count)]


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1); None without values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


# -- one at a time against concurrent


def run_clients(base_url: str, requests: list, clients: int, max_tokens: int) -> dict:
    """Send `requests` from `clients` threads (round robin); wall time, tokens and per-request latency."""
    latencies: list[float] = []
    generated = [0]
    lock = threading.Lock()

    def work(mine: list) -> None:
        with GenerationClient(base_url=base_url, connection_timeout=30) as client:
            for prompts in mine:
                start = time.perf_counter()
                out = client.generate(prompts, max_tokens=max_tokens, temperature=1.0, logprobs=None,
                                      generation_kwargs={"ignore_eos": True})
                with lock:
                    latencies.append(time.perf_counter() - start)
                    generated[0] += sum(len(ids) for ids in out["completion_ids"])

    threads = [threading.Thread(target=work, args=(requests[i::clients],)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return {"clients": clients, "wall_s": wall, "tokens": generated[0], "tokens_per_s": generated[0] / wall,
            "latency_p50_s": statistics.median(latencies), "latency_p95_s": percentile(latencies, 0.95)}


def compare(base_url: str, requests: list, clients: int, max_tokens: int) -> dict:
    run_clients(base_url, requests[:2], 1, max_tokens)  # warm-up
    sequential = run_clients(base_url, requests, 1, max_tokens)
    concurrent = run_clients(base_url, requests, clients, max_tokens)
    return {"one_at_a_time": sequential, "concurrent": concurrent,
            "speedup": concurrent["tokens_per_s"] / sequential["tokens_per_s"]}


def print_comparison(result: dict, args: argparse.Namespace) -> None:
    print(f"{'clients':>8}{'tokens/s':>12}{'p50 s':>10}{'p95 s':>10}")
    for row in (result["one_at_a_time"], result["concurrent"]):
        print(f"{row['clients']:>8}{row['tokens_per_s']:>12.1f}{row['latency_p50_s']:>10.3f}"
              f"{row['latency_p95_s']:>10.3f}")
    print(f"{args.requests} requests x {args.prompts_per_request} prompts x {args.max_tokens} tokens: "
          f"{args.clients} clients at once = {result['speedup']:.2f}x the one-at-a-time throughput")


# -- sustained load


@dataclass
class Outcome:
    """One request: when it started and ended (seconds into the run), how it ended, tokens generated."""

    start: float
    end: float
    status: str  # the HTTP status code, "timeout" or "transport error"
    tokens: int

    @property
    def latency(self) -> float:
        return self.end - self.start


def sustained_load(server: ServerProcess, requests: list, clients: int, duration_s: float, max_tokens: int,
                   request_timeout_s: float, kill_after_s: float | None) -> dict:
    """`clients` threads send requests in a loop for `duration_s`; optionally SIGKILL the last engine
    worker `kill_after_s` in. Returns the counts, latencies and what the kill did."""
    lock = threading.Lock()
    outcomes: list[Outcome] = []
    sent = [0]
    stop = threading.Event()
    origin = time.perf_counter()

    def now() -> float:
        return time.perf_counter() - origin

    def client_loop(index: int) -> None:
        rng = random.Random(index)
        with httpx.Client(base_url=server.base_url, timeout=request_timeout_s) as http:
            while not stop.is_set():
                body = {"prompts": rng.choice(requests), "max_tokens": max_tokens, "temperature": 1.0,
                        "logprobs": None, "generation_kwargs": {"ignore_eos": True}}
                with lock:
                    sent[0] += 1
                start = now()
                tokens = 0
                try:
                    response = http.post("/generate", json=body)
                    status = str(response.status_code)
                    if response.status_code == 200:
                        tokens = sum(len(ids) for ids in response.json()["completion_ids"])
                except httpx.TimeoutException:
                    status = "timeout"
                except httpx.TransportError:
                    status = "transport error"
                with lock:
                    outcomes.append(Outcome(start, now(), status, tokens))
                if status != "200":
                    stop.wait(FAILURE_BACKOFF_S)

    victim = None
    if kill_after_s is not None:
        engines = httpx.get(f"{server.base_url}/stats", timeout=30).json()["engines"]
        victim = max(engines, key=lambda engine: engine["dp_rank"])
    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    kill = None
    if victim is not None:
        time.sleep(max(0.0, kill_after_s - now()))
        kill = kill_worker(server.base_url, victim, now)
    time.sleep(max(0.0, duration_s - now()))
    stop.set()
    load_s = now()
    deadline = time.monotonic() + request_timeout_s + 5
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    with lock:
        ended = list(outcomes)
        lost = sent[0] - len(ended)
    return summarize(ended, sent[0], lost, load_s, kill)


def kill_worker(base_url: str, engine: dict, now) -> dict:
    """SIGKILL one engine worker; wait (at most 30 s) for /health to report it."""
    os.kill(engine["pid"], signal.SIGKILL)
    killed_at = now()
    health = {"status_code": None, "detail": None}
    while now() - killed_at < 30:
        try:
            response = httpx.get(f"{base_url}/health", timeout=2.0)
            if response.status_code != 200:
                health = {"status_code": response.status_code, "detail": response.json().get("detail")}
                break
        except httpx.TransportError as error:
            health = {"status_code": None, "detail": f"no answer: {error!r}"}
        time.sleep(HEALTH_POLL_S)
    return {"dp_rank": engine["dp_rank"], "pid": engine["pid"], "at_s": killed_at,
            "health_reported_after_s": now() - killed_at if health["status_code"] else None, "health": health}


def summarize(outcomes: list[Outcome], sent: int, lost: int, load_s: float, kill: dict | None) -> dict:
    completed = [o for o in outcomes if o.status == "200"]
    failed = [o for o in outcomes if o.status != "200"]
    tokens = sum(o.tokens for o in completed)
    wall_s = max([load_s] + [o.end for o in outcomes])  # the drain after the stop included
    failures: dict[str, int] = {}
    for outcome in failed:
        failures[outcome.status] = failures.get(outcome.status, 0) + 1
    latencies = [o.latency for o in completed]
    result = {"sent": sent, "completed": len(completed), "failed": len(failed), "lost": lost,
              "failures_by_status": failures, "load_s": load_s, "wall_s": wall_s, "tokens": tokens,
              "tokens_per_s": tokens / wall_s, "latency_p50_s": percentile(latencies, 0.5),
              "latency_p99_s": percentile(latencies, 0.99), "latency_max_s": max(latencies, default=None)}
    if kill is not None:
        at = kill["at_s"]
        before = [o for o in completed if o.end <= at]
        after = [o for o in outcomes if o.end > at]
        in_flight = [o for o in after if o.start <= at]
        kill.update(
            completed_before=len(before), tokens_per_s_before=sum(o.tokens for o in before) / at,
            latency_p50_before_s=percentile([o.latency for o in before], 0.5),
            ended_after=len(after), failed_after=sum(o.status != "200" for o in after),
            completed_after=sum(o.status == "200" for o in after),
            in_flight_at_kill=len(in_flight),
            longest_in_flight_s=max((o.latency for o in in_flight), default=None),
            in_flight_settled_after_s=max((o.end - at for o in in_flight), default=None),
            longest_after_kill_s=max((o.latency for o in after), default=None),
            longest_sent_after_kill_s=max((o.latency for o in after if o.start > at), default=None),
        )
        result["kill"] = kill
    return result


def print_sustained(result: dict) -> None:
    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    rows = [("clients", result["clients"]), ("duration s", f"{result['load_s']:.1f}"), ("sent", result["sent"]),
            ("completed", result["completed"]), ("failed", result["failed"]),
            ("  by status", json.dumps(result["failures_by_status"]) if result["failed"] else "-"),
            ("lost", result["lost"]), ("latency p50 s", seconds(result["latency_p50_s"])),
            ("latency p99 s", seconds(result["latency_p99_s"])), ("tokens/s", f"{result['tokens_per_s']:.1f}")]
    kill = result.get("kill")
    if kill:
        rows += [("killed worker", f"dp{kill['dp_rank']} (pid {kill['pid']}) at {kill['at_s']:.1f}s"),
                 ("  before it: completed", kill["completed_before"]),
                 ("  before it: tokens/s", f"{kill['tokens_per_s_before']:.1f}"),
                 ("/health reported after s", seconds(kill["health_reported_after_s"])),
                 ("/health", f"{kill['health']['status_code']}: {kill['health']['detail']}"),
                 ("in flight at the kill", kill["in_flight_at_kill"]),
                 ("  all settled after s", seconds(kill["in_flight_settled_after_s"])),
                 ("ended after the kill", kill["ended_after"]), ("  failed", kill["failed_after"]),
                 ("  completed", kill["completed_after"]),
                 ("  longest latency s", seconds(kill["longest_after_kill_s"])),
                 ("  longest, sent after kill s", seconds(kill["longest_sent_after_kill_s"]))]
    if "server_stop" in result:
        rows.append(("server stop (SIGTERM)", f"exit {result['server_stop']['exit_code']} in "
                                              f"{result['server_stop']['seconds']:.1f}s"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder (default: random weights of --shape)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32, help="requests (distinct ones, with --duration)")
    parser.add_argument("--prompts-per-request", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--duration", type=float, help="seconds of sustained load (instead of the comparison)")
    parser.add_argument("--request-timeout", type=float, default=30.0, help="seconds per request (--duration)")
    parser.add_argument("--kill-worker-after", type=float, help="SIGKILL an engine worker this many seconds in")
    parser.add_argument("--out", default="load.json")
    args = parser.parse_args()
    if args.kill_worker_after is not None and (args.duration is None or args.dp < 2):
        parser.error("--kill-worker-after needs --duration and --dp >= 2")

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = str(Path(tmp) / args.shape)
            write_checkpoint(Path(model), args.shape, torch.float32)
        vocab = model_config(args.shape).vocab_size if not args.model else 256
        requests = make_requests(args.requests, args.prompts_per_request, args.prompt_len, vocab, seed=0)
        # The server keeps its own (long) request timeout: a request that hangs shows as a client time-out.
        server = ServerProcess(model, log_path=Path(tmp) / "server.log", tensor_parallel_size=args.tp,
                               data_parallel_size=args.dp)
        try:
            server.wait_ready(900)
            if args.duration is None:
                result = compare(server.base_url, requests, args.clients, args.max_tokens)
            else:
                run_clients(server.base_url, requests[:2], 1, args.max_tokens)  # warm-up
                result = sustained_load(server, requests, args.clients, args.duration, args.max_tokens,
                                        args.request_timeout, args.kill_worker_after)
        finally:
            stop_start = time.perf_counter()
            exit_code = server.stop()
            stop_s = time.perf_counter() - stop_start

    result = {"shape": args.shape, "model": args.model, "tp": args.tp, "dp": args.dp, "clients": args.clients,
              "requests": args.requests, "prompts_per_request": args.prompts_per_request,
              "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, **result,
              "server_stop": {"exit_code": exit_code, "seconds": stop_s}, "load_average_after": os.getloadavg()}
    Path(args.out).write_text(json.dumps(result, indent=2))
    if args.duration is None:
        print_comparison(result, args)
    else:
        print_sustained(result)


if __name__ == "__main__":
    main()
