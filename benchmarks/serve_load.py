"""Load test of ``ctxaware serve`` on loopback: batching server vs one-at-a-time ``SteeredModel.chat``.

N client threads (the real ``openai`` client) send a fixed number of chat requests (document +
question prompts, greedy, ``max_tokens`` each) to ``ctxaware serve`` started as its own process on
127.0.0.1, and the same prompts are answered one at a time by ``SteeredModel.chat`` as the baseline. Printed:
requests/s, output tokens/s, p50/p95 latency per setting, and the two ratios the server claims:

* server (8 clients) output tokens/s ÷ one-at-a-time output tokens/s (target >= 3 on 2 CPU cores);
* steered traffic ÷ unsteered traffic output tokens/s through the server (target >= 0.9).

Output tokens of the server are its ``usage.completion_tokens``; those of the baseline are the
reply re-tokenized (+1 for the end-of-turn token when the reply ended before ``max_tokens``).

    python benchmarks/serve_load.py                       # embedded model, 8 clients, 24 requests
    python benchmarks/serve_load.py --requests 16 --max-tokens 24 --threads 1 --json runs/serve_load.json
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import torch

TOPICS = [
    ("The Karren Point lighthouse was painted green in 1911; its keeper was Ada Voss.", "Who kept the lighthouse?"),
    ("Mira's bakery opens at six and sells rye bread, plum cake and walnut rolls.", "When does the bakery open?"),
    ("The river Osk floods every April, so the village moved its market to the hill.", "Why did the market move?"),
    ("Tomas keeps his bicycle in the blue shed behind the school gym.", "Where is the bicycle kept?"),
    ("The committee chose Lisbon for the 2031 meeting because of its new port.", "Which city was chosen?"),
    ("Pilot Reyes landed the glider on the salt flat after the winch cable snapped.", "Where did the glider land?"),
    ("The recipe needs three eggs, a cup of flour and a pinch of smoked salt.", "How many eggs are needed?"),
    ("Station 9 measured a wind of 140 km/h on the night of the storm.", "What wind speed was measured?"),
]


def prompts(count: int) -> list[list[dict]]:
    out = []
    for i in range(count):
        fact, question = TOPICS[i % len(TOPICS)]
        filler = " ".join(f"Note {j}: the weather stayed mild and nothing else happened." for j in range(i % 3 + 2))
        out.append([{"role": "user", "content": f"Document: {filler} {fact}\n\nQuestion: {question}"}])
    return out


def summarize(name: str, latencies: list[float], tokens: int, wall: float) -> dict:
    lat = sorted(latencies)
    p95 = lat[min(len(lat) - 1, max(0, round(0.95 * len(lat)) - 1))]
    return {"setting": name, "requests": len(lat), "seconds": wall, "req_per_s": len(lat) / wall,
            "out_tok_per_s": tokens / wall, "p50_s": statistics.median(lat), "p95_s": p95, "out_tokens": tokens}


def baseline(model, tok, convs, max_tokens: int) -> dict:
    from ctxaware.steering import SteeredModel

    chat = SteeredModel(model, tok)
    chat.chat(convs[0], max_new_tokens=4)  # warm-up
    latencies, tokens = [], 0
    t0 = time.perf_counter()
    for msgs in convs:
        t = time.perf_counter()
        reply = chat.chat(msgs, max_new_tokens=max_tokens)
        latencies.append(time.perf_counter() - t)
        n = len(tok(reply, add_special_tokens=False).input_ids)
        tokens += min(max_tokens, n + 1) if n < max_tokens else max_tokens
    return summarize("one-at-a-time SteeredModel.chat", latencies, tokens, time.perf_counter() - t0)


def load(base_url: str, convs, clients: int, max_tokens: int, exts: list[dict | None], name: str) -> dict:
    """``clients`` threads send ``convs`` (request i with ``"ctxaware": exts[i]`` when not None)."""
    import openai

    local = threading.local()

    def call(i):
        if not hasattr(local, "client"):
            local.client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
        t = time.perf_counter()
        resp = local.client.chat.completions.create(model="m", messages=convs[i], max_tokens=max_tokens,
                                                    temperature=0,
                                                    extra_body={"ctxaware": exts[i]} if exts[i] else None)
        return time.perf_counter() - t, resp.usage.completion_tokens

    with cf.ThreadPoolExecutor(clients) as pool:
        list(pool.map(call, range(min(clients, len(convs)))))  # warm-up: one request per client
        t0 = time.perf_counter()
        results = list(pool.map(call, range(len(convs))))
        wall = time.perf_counter() - t0
    return summarize(name, [r[0] for r in results], sum(r[1] for r in results), wall)


def start_server(model: str | None, dtype: str, clients: int, threads: int | None) -> tuple[subprocess.Popen, str]:
    """``ctxaware serve`` as its own process (as in production: clients elsewhere), on a free port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    cmd = [sys.executable, "-m", "ctxaware", "serve", "--port", str(port), "--max-concurrency", str(clients),
           "--timeout", "3600", "--served-name", "m", "--dtype", dtype, *(["--model", model] if model else [])]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import httpx

    for _ in range(3000):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, f"http://127.0.0.1:{port}/v1"
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"ctxaware serve exited with status {proc.returncode}")
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("ctxaware serve did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="auto", help="weights dtype of both sides (default: auto, the server's "
                        "default: bfloat16 where the hardware computes it fast, else float32)")
    parser.add_argument("--requests", type=int, default=24, help="requests per setting (default: 24)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default: 8)")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request (default: 32)")
    parser.add_argument("--alpha", type=float, default=0.9, help="alpha of the steered traffic (default: 0.9)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the baseline and the server "
                        "(default: torch's choice)")
    parser.add_argument("--rounds", type=int, default=2, help="measure every setting this many times, "
                        "interleaved, and keep each setting's best round (damps a shared machine's noise; default: 2)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from ctxaware.models import load_model

    model, tok = load_model(args.model, dtype=args.dtype)
    convs = prompts(args.requests)
    n, c = len(convs), args.clients
    settings = [("one-at-a-time SteeredModel.chat", None),
                (f"server, {c} clients, unsteered", [None] * n),
                (f"server, {c} clients, steered (alpha {args.alpha}, all heads)", [{"alpha": args.alpha}] * n),
                (f"server, {c} clients, half steered / half unsteered (one batch)",
                 [{"alpha": args.alpha} if i % 2 else None for i in range(n)])]
    best: dict[str, dict] = {}
    proc, base_url = start_server(args.model, args.dtype, c, args.threads)
    try:
        for _ in range(args.rounds):
            for name, exts in settings:
                row = (baseline(model, tok, convs, args.max_tokens) if exts is None
                       else load(base_url, convs, c, args.max_tokens, exts, name))
                row["setting"] = name
                if name not in best or row["out_tok_per_s"] > best[name]["out_tok_per_s"]:
                    best[name] = row
    finally:
        proc.terminate()
        proc.wait(60)
    rows = [best[name] for name, _ in settings]
    print(f"dtype {next(model.parameters()).dtype}; torch threads: {torch.get_num_threads()}; {args.requests} requests per setting, max_tokens "
          f"{args.max_tokens}, greedy; best of {args.rounds} interleaved round(s)\n")
    print("| setting | requests/s | output tokens/s | p50 latency (s) | p95 latency (s) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['setting']} | {r['req_per_s']:.2f} | {r['out_tok_per_s']:.1f} | {r['p50_s']:.2f} | "
              f"{r['p95_s']:.2f} |")
    base, plain, steered = rows[0]["out_tok_per_s"], rows[1]["out_tok_per_s"], rows[2]["out_tok_per_s"]
    print(f"\nserver unsteered / one-at-a-time output tokens/s: {plain / base:.2f}x (target >= 3)")
    print(f"server steered / one-at-a-time output tokens/s:   {steered / base:.2f}x")
    print(f"steered / unsteered traffic output tokens/s:       {steered / plain:.2f}x (target >= 0.9)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
