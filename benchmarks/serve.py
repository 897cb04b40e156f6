"""Load benchmark of ``openmythos serve``: concurrent clients against one at a time, then a
soak of aborted streams and disconnects.

    python benchmarks/serve.py                 # 16 clients x 32 tokens, soak 50 + 20
    python benchmarks/serve.py --clients 8 --tokens 16 --soak-streams 10 --soak-disconnects 5
    python benchmarks/serve.py --loop-mix 4,2   # also: requests of two depths at once

The server runs in a process of its own (uvicorn on 127.0.0.1, a free port) over a small
random byte-level model (``--dim``, ``--loops``); the clients are threads of this process,
each with its own keep-alive HTTP connection, opened before timing. Every request is greedy
with ``max_tokens=--tokens`` and a prompt of its own.

* **one at a time**: the ``--clients`` requests sent one after the other (the baseline);
* **concurrent**: the same requests sent at once (a barrier releases them), one per client.

Both print aggregate completion tokens/s, p50/p99 latency and errors; the ratio row is
concurrent over one at a time. The soak then opens ``--soak-streams`` streams and closes each
after two events, sends ``--soak-disconnects`` non-streaming requests that give up after
``--disconnect-after`` seconds, and measures a normal request's latency (median of 5)
against its idle latency before the soak, and the server's resident memory against its
level before the soak. Every request has a timeout; the script ends in bounded time.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table  # noqa: E402

from open_mythos.commands.argtypes import (  # noqa: E402
    loop_count,
    non_negative_int,
    positive_float,
    positive_int,
)

REQUEST_TIMEOUT = 120.0
#: Seconds the server process may take to load the model and bind its port.
START_TIMEOUT = 120.0
PROMPTS = ["the cat sat on the", "once upon a time", "a dog and a log", "it was a dark",
           "in the beginning", "we hold these", "to be or not", "the quick brown fox"]


def server_config(dim: int, loops: int):
    """The served model's :class:`MythosConfig` (byte vocabulary, 8 heads / 2 kv heads).

    Raises:
        ValueError: ``dim`` or ``loops`` the config refuses (``dim`` must be divisible by 8
            with an even head dim).
    """
    from open_mythos import ByteTokenizer, MythosConfig

    return MythosConfig(vocab_size=ByteTokenizer().vocab_size, dim=dim, n_heads=8,
                        n_kv_heads=2, max_seq_len=256, max_loop_iters=loops, prelude_layers=1,
                        coda_layers=1, attn_type="gqa", n_experts=8, n_shared_experts=1,
                        n_experts_per_tok=2, expert_dim=max(1, dim // 4), lora_rank=8)


def _serve(port_queue: mp.Queue, dim: int, loops: int, threads: int) -> None:
    """The server process: a seeded random model behind ``make_server`` on a free port."""
    import socket

    import torch

    from open_mythos import ByteTokenizer, OpenMythos
    from open_mythos.integrations.server import CompletionService, make_server

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tok = ByteTokenizer()
    cfg = server_config(dim, loops)
    service = CompletionService(OpenMythos(cfg).eval(), tok, model_name="bench", n_loops=loops)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port_queue.put((sock.getsockname()[1], os.getpid()))
    make_server(service, log_level="error").run(sockets=[sock])


def wait_for_port(server: mp.Process, ports: mp.Queue,
                  timeout: float = START_TIMEOUT) -> tuple[int, int]:
    """(port, pid) the server process reports once it listens; ``SystemExit`` at once if the
    process dies first (its traceback is on stderr), or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return ports.get(timeout=0.5)
        except queue.Empty:
            pass
        if not server.is_alive():
            raise SystemExit(f"the server process exited with code {server.exitcode} before "
                             "it listened (its error is above)")
        if time.monotonic() > deadline:
            raise SystemExit(f"the server process did not listen within {timeout:.0f} s")


def loop_mix(text: str) -> list[int]:
    """``"4,2"`` -> ``[4, 2]``: loop counts in request order, repeats kept (argparse type)."""
    parts = [x.strip() for x in text.split(",")]
    if not all(parts):
        raise argparse.ArgumentTypeError(f"loop counts must look like 4,2, got {text!r}")
    return [loop_count(x) for x in parts]


def rss_mib(pid: int) -> float:
    """Resident memory of process ``pid`` (Linux /proc), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one_request(client: httpx.Client, i: int, tokens: int,
                loop_mix: list[int] | None = None) -> tuple[float, int, bool]:
    """(latency s, completion tokens, ok) of one greedy completion (request ``i`` asks
    for ``n_loops = loop_mix[i % len(loop_mix)]`` when given)."""
    body = {"prompt": PROMPTS[i % len(PROMPTS)] + f" {i}", "max_tokens": tokens,
            "temperature": 0}
    if loop_mix:
        body["n_loops"] = loop_mix[i % len(loop_mix)]
    start = time.perf_counter()
    try:
        r = client.post("/v1/completions", json=body)
        ok = r.status_code == 200
        used = r.json()["usage"]["completion_tokens"] if ok else 0
    except httpx.HTTPError:
        ok, used = False, 0
    return time.perf_counter() - start, used, ok


def run_load(clients: list[httpx.Client], tokens: int, concurrent: bool,
             loop_mix: list[int] | None = None) -> dict[str, float]:
    """Request ``i`` from ``clients[i]`` (connections opened beforehand, as a real client
    keeps them): all at once, released together by a barrier, or one after the other."""
    n = len(clients)
    barrier = threading.Barrier(n)

    def client_run(i: int) -> tuple[float, int, bool]:
        barrier.wait()
        return one_request(clients[i], i, tokens, loop_mix)

    start = time.perf_counter()
    if concurrent:
        with ThreadPoolExecutor(n) as pool:
            results = list(pool.map(client_run, range(n)))
    else:
        results = [one_request(clients[i], i, tokens, loop_mix) for i in range(n)]
    wall = time.perf_counter() - start
    latencies = sorted(t for t, _, _ in results)
    return {"tok_s": sum(k for _, k, _ in results) / wall, "wall": wall,
            "p50": statistics.median(latencies), "p99": _percentile(latencies, 0.99),
            "errors": sum(not ok for _, _, ok in results)}


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    k = max(0, min(len(sorted_values) - 1, round(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


def soak(url: str, streams: int, disconnects: int, after: float, tokens: int) -> int:
    """Abort ``streams`` streams after two events and give up ``disconnects`` requests
    after ``after`` seconds (four at a time); returns how many did not behave (a stream
    that did not start with 200, a request that answered instead of timing out)."""
    body = {"prompt": "the cat", "max_tokens": tokens, "n": 4, "temperature": 0}

    def abort_stream(i: int) -> bool:
        with httpx.Client(timeout=REQUEST_TIMEOUT) as client:
            with client.stream("POST", f"{url}/v1/completions",
                               json={**body, "stream": True}) as r:
                if r.status_code != 200:
                    return False
                lines = r.iter_lines()
                next(lines)
                next(lines)
        return True

    def disconnect(i: int) -> bool:
        try:
            with httpx.Client(timeout=after) as client:
                client.post(f"{url}/v1/completions", json={**body, "max_tokens": 200})
        except httpx.TimeoutException:
            return True
        return False

    with ThreadPoolExecutor(4) as pool:
        bad = sum(not ok for ok in pool.map(abort_stream, range(streams)))
        bad += sum(not ok for ok in pool.map(disconnect, range(disconnects)))
    return bad


def normal_latency(client: httpx.Client, tokens: int) -> float:
    return statistics.median(one_request(client, i, tokens)[0] for i in range(5))


def wait_idle(url: str, timeout: float = 30.0) -> bool:
    """Wait until the server runs nothing (cancelled work has left the batch)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = httpx.get(f"{url}/health", timeout=REQUEST_TIMEOUT).json()
        if stats["running"] == stats["prefilling"] == stats["waiting"] == 0:
            return True
        time.sleep(0.05)
    return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=positive_int, default=16)
    p.add_argument("--tokens", type=positive_int, default=32)
    p.add_argument("--dim", type=positive_int, default=256,
                   help="model width: a multiple of 16 (8 heads of an even width)")
    p.add_argument("--loops", type=positive_int, default=4)
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads of the server")
    p.add_argument("--soak-streams", type=non_negative_int, default=50)
    p.add_argument("--soak-disconnects", type=non_negative_int, default=20)
    p.add_argument("--disconnect-after", type=positive_float, default=0.3)
    p.add_argument("--loop-mix", type=loop_mix, metavar="N,M",
                   help="also run the load with requests cycling over these n_loops (each "
                        "depth decodes in a batch of its own), e.g. 4,2; at most 2 x --loops")
    args = p.parse_args(argv)
    try:
        server_config(args.dim, args.loops)
    except ValueError as err:
        p.error(f"--dim {args.dim}: {err}")
    # The longest prompt (bytes, with " <index>") and the tokens after it fit the context.
    room = server_config(args.dim, args.loops).max_seq_len - max(map(len, PROMPTS)) - 8
    if args.tokens > room:
        p.error(f"--tokens {args.tokens}: the served model's context holds at most {room} "
                "tokens after the benchmark's prompts")
    if args.loop_mix and max(args.loop_mix) > 2 * args.loops:
        p.error(f"--loop-mix {max(args.loop_mix)}: above the server's cap of 2 x --loops = "
                f"{2 * args.loops} loops")

    ctx = mp.get_context("spawn")
    ports: mp.Queue = ctx.Queue()
    server = ctx.Process(target=_serve, args=(ports, args.dim, args.loops, args.threads),
                         daemon=True)
    server.start()
    try:
        port, pid = wait_for_port(server, ports)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                httpx.get(f"{url}/health", timeout=5).raise_for_status()
                break
            except httpx.HTTPError:
                if not server.is_alive():
                    raise SystemExit(f"the server process exited with code {server.exitcode} "
                                     "before it answered (its error is above)") from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        clients = [httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT)
                   for _ in range(args.clients)]
        for client in clients:
            client.get("/health").raise_for_status()  # open the connection
        run_load(clients[:4], args.tokens, concurrent=True)  # warm up
        sequential = run_load(clients, args.tokens, concurrent=False)
        concurrent = run_load(clients, args.tokens, concurrent=True)
        rows = [[name, f"{r['tok_s']:.1f}", f"{r['wall']:.2f}", f"{r['p50']:.3f}",
                 f"{r['p99']:.3f}", f"{int(r['errors'])}"]
                for name, r in [("one at a time", sequential), ("concurrent", concurrent)]]
        rows.append(["ratio", f"{concurrent['tok_s'] / sequential['tok_s']:.2f}x", "",
                     "", f"p99/p50 {concurrent['p99'] / concurrent['p50']:.2f}", ""])
        if args.loop_mix:
            mix = ",".join(map(str, args.loop_mix))
            for name, concurrently in [("one at a time", False), ("concurrent", True)]:
                r = run_load(clients, args.tokens, concurrently, args.loop_mix)
                rows.append([f"{name}, n_loops {mix}", f"{r['tok_s']:.1f}", f"{r['wall']:.2f}",
                             f"{r['p50']:.3f}", f"{r['p99']:.3f}", f"{int(r['errors'])}"])
        print(f"{args.clients} clients x {args.tokens} tokens, dim {args.dim}, "
              f"{args.loops} loops, server torch threads {args.threads}")
        print_table(["mode", "tok/s", "wall s", "p50 s", "p99 s", "errors"], rows)

        idle, rss_before = normal_latency(clients[0], args.tokens), rss_mib(pid)
        bad = soak(url, args.soak_streams, args.soak_disconnects, args.disconnect_after,
                   args.tokens)
        idle_after_soak = wait_idle(url)
        after, rss_after = normal_latency(clients[0], args.tokens), rss_mib(pid)
        print(f"\nsoak: {args.soak_streams} aborted streams, {args.soak_disconnects} "
              f"disconnects ({bad} misbehaved); server idle afterwards: {idle_after_soak}")
        print_table(["", "before soak", "after soak", "ratio"], [
            ["normal request latency s", f"{idle:.3f}", f"{after:.3f}", f"{after / idle:.2f}"],
            ["server RSS MiB", f"{rss_before:.0f}", f"{rss_after:.0f}",
             f"{rss_after / rss_before:.2f}"]])
    finally:
        server.terminate()
        server.join(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
