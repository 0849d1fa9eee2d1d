"""Steering inside vLLM, side by side: steered vs unsteered vLLM, ``ctxaware serve`` vs ``vllm serve`` + the
ctxaware plugin, and an NIH grid on the transformers engine vs ``--engine vllm`` — one run, ratios printed.

1. **Throughput through the OpenAI server.** vLLM's own server (``python -m vllm.entrypoints.openai.api_server``
   with ``--middleware ctxaware.vllm.server.CtxawareMiddleware``; the plugin loads through its entry point) and
   ``ctxaware serve`` on the same model and dtype, each its own process on 127.0.0.1, get the same chat
   requests from 1 and from 8 concurrent clients (the ``openai`` client, greedy, ``max_tokens``), unsteered
   and steered (``"ctxaware": {"alpha": ...}``). Every request of a pass opens with its own nonce, so no
   pass reuses another's prefix-cache blocks. Printed: output tokens/s (``usage.completion_tokens``) per
   setting, steered / unsteered per server (target >= 0.9 at 8 clients) and vLLM / ctxaware serve.
2. **NIH grid wall time.** ``ctxaware niah`` with ``--engine transformers`` and with ``--engine vllm`` (same
   grid, dtype and modes, fresh directories, each a process of its own): wall time of the whole command
   (model load and vLLM start included) and the cells' own seconds, and how many answers agree.

The machine's load average is printed before and after (a shared machine's other work slows both sides).
Run it in the vLLM environment::

    .venv-vllm/bin/python benchmarks/vllm_steering.py                # embedded model, fp32, CPU, a few minutes
    .venv-vllm/bin/python benchmarks/vllm_steering.py --skip-niah --max-tokens 64 --json runs/vllm_steering.json
    python3 benchmarks/vllm_steering.py --check                      # one line: can this machine run it?
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def check() -> str | None:
    """Why this machine cannot run the benchmark (``None`` when it can)."""
    if importlib.util.find_spec("vllm") is None:
        return ("vLLM is not installed in this Python (no CUDA vLLM wheel travels to the device; install "
                "'ctxaware[vllm]' there): the vLLM benchmark is skipped")
    for mod in ("openai", "httpx", "fastapi"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (pip install 'ctxaware[dev]'): the vLLM benchmark is skipped"
    return None


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(proc: subprocess.Popen, url: str, log: Path, timeout: float) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with status {proc.returncode}:\n" + log.read_text()[-3000:])
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise SystemExit(f"server did not start in {timeout:.0f} s:\n" + log.read_text()[-3000:])


def threads_env(threads: int | None) -> dict[str, str]:
    """The same CPU threads for every side: torch's OpenMP threads, and vLLM's CPU worker bound to that many
    cores (on a shared machine, OpenMP threads left unbound spin against each other and other jobs)."""
    if not threads:
        return {}
    return {"OMP_NUM_THREADS": str(threads), "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}"}


def start_vllm(model_dir: str, dtype: str, eager: bool, max_len: int, tmp: Path,
               threads: int | None) -> tuple[subprocess.Popen, str]:
    """vLLM's OpenAI server with ctxaware's middleware, in its own process group (killed whole at the end)."""
    port = _port()
    log = tmp / "vllm-server.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--served-model-name",
           "m", "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype, "--max-model-len", str(max_len),
           "--middleware", "ctxaware.vllm.server.CtxawareMiddleware", *(["--enforce-eager"] if eager else [])]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **threads_env(threads)}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(proc, url, log, 900)
    except BaseException:
        stop(proc)
        raise
    return proc, url + "/v1"


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def start_ctxaware(model: str, dtype: str, clients: int, threads: int | None) -> tuple[subprocess.Popen, str]:
    from serve_load import start_server

    return start_server(model, dtype, clients, threads)


def conversations(count: int, tag: str) -> list[list[dict]]:
    """serve_load's document + question prompts, each opened by a nonce of its own (no shared cache blocks)."""
    from serve_load import prompts

    return [[{"role": "user", "content": f"[{tag}-{i}] " + c[0]["content"]}] for i, c in enumerate(prompts(count))]


def load(base_url: str, warm: list, convs: list, clients: int, max_tokens: int, ext: dict | None) -> dict:
    """``clients`` threads (one ``openai`` client each) send ``warm`` (not timed), then ``convs`` (timed)."""
    import concurrent.futures as cf
    import threading

    import openai
    from serve_load import summarize

    local = threading.local()

    def call(conv):
        if not hasattr(local, "client"):
            local.client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=900)
        t = time.perf_counter()
        resp = local.client.chat.completions.create(model="m", messages=conv, max_tokens=max_tokens, temperature=0,
                                                    extra_body={"ctxaware": ext} if ext else None)
        return time.perf_counter() - t, resp.usage.completion_tokens

    with cf.ThreadPoolExecutor(clients) as pool:
        list(pool.map(call, warm))
        t0 = time.perf_counter()
        results = list(pool.map(call, convs))
        wall = time.perf_counter() - t0
    return summarize("", [r[0] for r in results], sum(r[1] for r in results), wall)


def throughput(url: str, server: str, clients_list: list[int], requests: int, max_tokens: int, alpha: float) -> list[dict]:
    rows = []
    for clients in clients_list:
        n = max(requests, 2 * clients) if clients > 1 else max(2, requests // 2)
        for steer in (False, True):
            convs = conversations(n + clients, f"{server[:2]}{clients}{'s' if steer else 'p'}")
            name = f"{server}, {clients} client{'s' if clients > 1 else ''}, " + \
                   (f"steered (alpha {alpha})" if steer else "unsteered")
            try:
                row = load(url, convs[:clients], convs[clients:], clients, max_tokens,
                           {"alpha": alpha} if steer else None)
            except Exception as exc:  # noqa: BLE001 - e.g. a 400: the plugin cannot steer on this platform
                if not steer:
                    raise
                row = {"requests": 0, "out_tok_per_s": float("nan"), "refused": str(exc).splitlines()[0][:300]}
                print(f"  {name}: refused: {row['refused']}", flush=True)
            row.update(setting=name, server=server, clients=clients, steered=steer)
            rows.append(row)
            print(f"  {name}: {row['out_tok_per_s']:.1f} output tokens/s ({row['requests']} requests)", flush=True)
    return rows


def niah(engine: str, model: str, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, "-m", "ctxaware", "niah", "--model", model, "--engine", engine, "--dtype", args.dtype,
           "--lengths", args.niah_lengths, "--depths", args.niah_depths, "--modes", args.niah_modes,
           "--alpha", str(args.alpha), "--out", str(out), "--no-progress"]
    if engine == "vllm":
        opts = {"max_model_len": args.max_model_len, **({"enforce_eager": True} if args.eager else {})}
        cmd += ["--vllm-options", json.dumps(opts)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **threads_env(args.threads)}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, start_new_session=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"ctxaware niah --engine {engine} failed:\n{proc.stderr[-3000:]}")
    from ctxaware.niah.results import read_records, read_timings

    records = read_records(out)
    return {"engine": engine, "wall_s": wall, "cells": len(records),
            "cells_s": sum(read_timings(out).values()), "answers": [r["answer"] for r in records],
            "recall": sum(r["recall"] for r in records) / max(1, len(records))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only say whether this machine can run it (one line)")
    p.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct, converted once)")
    p.add_argument("--dtype", default="float32", help="dtype of every side (default: float32)")
    p.add_argument("--clients", default="1,8", help="concurrent clients (default: 1,8)")
    p.add_argument("--requests", type=int, default=16, help="requests per multi-client setting (default: 16; "
                   "half of it with one client)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request (default: 32)")
    p.add_argument("--alpha", type=float, default=0.6, help="alpha of the steered traffic and +steer cells")
    p.add_argument("--max-model-len", type=int, default=4096, help="vLLM's max_model_len (default: 4096)")
    p.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                   help="vLLM --enforce-eager (default: on; torch.compile costs minutes at start on a CPU)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of every side (torch OpenMP threads; vLLM's "
                   "worker bound to cores 0..N-1); 0 = each engine's own choice (default: 1, for a shared machine)")
    p.add_argument("--niah-lengths", default="1000,2000", help="NIH lengths (default: 1000,2000)")
    p.add_argument("--niah-depths", default="0,50,100", help="NIH depths (default: 0,50,100)")
    p.add_argument("--niah-modes", default="chat,chat+prefix,chat+steer", help="NIH modes")
    p.add_argument("--skip-serve", action="store_true", help="skip the server throughput part")
    p.add_argument("--skip-ctxaware-serve", action="store_true", help="skip ctxaware serve (vLLM only)")
    p.add_argument("--skip-niah", action="store_true", help="skip the NIH grid part")
    p.add_argument("--json", metavar="FILE", help="also write every row as JSON")
    args = p.parse_args()
    reason = check()
    if args.check or reason:
        print(reason or "vLLM benchmark: this machine can run it")
        return
    import vllm

    from ctxaware.vllm.models import embedded_model_dir

    model = args.model or embedded_model_dir()
    clients = [int(c) for c in args.clients.split(",")]
    load0 = os.getloadavg()
    print(f"vLLM {vllm.__version__}; model {model}; dtype {args.dtype}; {os.cpu_count()} CPUs, "
          f"{args.threads or 'default'} thread(s) per side; "
          f"load average {load0[0]:.1f} {load0[1]:.1f} {load0[2]:.1f}", flush=True)
    result: dict = {"load_before": load0, "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="vllm-bench-") as tmp_name:
        tmp = Path(tmp_name)
        if not args.skip_serve:
            print("vllm serve + ctxaware plugin:", flush=True)
            proc, url = start_vllm(model, args.dtype, args.eager, args.max_model_len, tmp, args.threads)
            try:
                rows = throughput(url, "vllm serve + plugin", clients, args.requests, args.max_tokens, args.alpha)
            finally:
                stop(proc)
            if not args.skip_ctxaware_serve:
                print("ctxaware serve:", flush=True)
                proc, url = start_ctxaware(model, args.dtype, max(clients), args.threads)
                try:
                    rows += throughput(url, "ctxaware serve", clients, args.requests, args.max_tokens, args.alpha)
                finally:
                    proc.terminate()
                    proc.wait(60)
            result["serve"] = rows
        if not args.skip_niah:
            print("NIH grid:", flush=True)
            result["niah"] = [niah(e, model, args, tmp / f"niah-{e}") for e in ("transformers", "vllm")]
    result["load_after"] = os.getloadavg()
    report(result, clients)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def report(result: dict, clients: list[int]) -> None:
    la, lb = result["load_before"], result["load_after"]
    print(f"\nload average before {la[0]:.1f}, after {lb[0]:.1f} (1-minute)")
    rows = result.get("serve") or []
    if rows:
        print("\n| server | clients | unsteered tok/s | steered tok/s | steered / unsteered |")
        print("|---|---:|---:|---:|---:|")
        tps = {(r["server"], r["clients"], r["steered"]): r["out_tok_per_s"] for r in rows}
        for server in dict.fromkeys(r["server"] for r in rows):
            for c in clients:
                plain, steered = tps[(server, c, False)], tps[(server, c, True)]
                print(f"| {server} | {c} | {plain:.1f} | {steered:.1f} | {steered / plain:.2f}x |")
        for c in clients:
            v, s = ("vllm serve + plugin", c), ("ctxaware serve", c)
            if (*s, False) in tps:
                print(f"vllm serve + plugin / ctxaware serve, {c} client(s): unsteered "
                      f"{tps[(*v, False)] / tps[(*s, False)]:.2f}x, steered {tps[(*v, True)] / tps[(*s, True)]:.2f}x")
        c = max(clients)
        ratio = tps[("vllm serve + plugin", c, True)] / tps[("vllm serve + plugin", c, False)]
        print(f"vLLM steered / unsteered at {c} clients: {ratio:.2f}x (target >= 0.9)")
    runs = result.get("niah")
    if runs:
        tf, vl = runs
        same = sum(a == b for a, b in zip(tf["answers"], vl["answers"]))
        print("\n| NIH engine | cells | wall s (whole command) | cells' own s | mean recall |")
        print("|---|---:|---:|---:|---:|")
        for r in runs:
            print(f"| {r['engine']} | {r['cells']} | {r['wall_s']:.1f} | {r['cells_s']:.1f} | {r['recall']:.3f} |")
        print(f"transformers / vllm wall time: {tf['wall_s'] / vl['wall_s']:.2f}x; cells' own time: "
              f"{tf['cells_s'] / max(vl['cells_s'], 1e-9):.2f}x; identical answers: {same} of {len(tf['answers'])}")


if __name__ == "__main__":
    main()
