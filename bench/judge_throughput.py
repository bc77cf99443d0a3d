"""Judge throughput: sequential (the seed's loop) vs concurrent requests, against a fake API.

Starts tests/fake_responses_server.py as a subprocess with a fixed latency per request
(default 200 ms, a typical hosted-judge round trip), then judges the same N pairs with
``hhdpo.evaluation.judge`` at concurrency 1 and at concurrency C through the real ``openai``
client, and prints requests/s for both and their ratio (target: >= 20x at C=32).

    python bench/judge_throughput.py [--requests 128] [--latency 0.2] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_fake_server(latency: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_responses_server.py"), "--latency", str(latency)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        raise RuntimeError(f"fake server did not start: {line!r}")
    return proc, f"http://127.0.0.1:{int(line.split()[1])}/v1"


def make_pairs(path: Path, n: int) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from fake_responses_server import hh_generation_records

    from hhdpo.evaluation.pairwise import make_pairwise

    gen = path.with_name("gen.jsonl")
    gen.write_text("".join(json.dumps(r) + "\n" for r in hh_generation_records(n)))
    make_pairwise(gen, path, shuffle_ab=True, seed=0)


def measure(pairs: Path, out: Path, base_url: str, concurrency: int) -> tuple[float, int]:
    from hhdpo.core.config import JudgeConfig
    from hhdpo.evaluation.judge import JudgeSettings, judge_files
    from hhdpo.evaluation.judge_api import make_client

    settings = JudgeSettings(JudgeConfig(model="fake-judge", concurrency=concurrency), progress=False)

    async def run():
        client = make_client(base_url, settings.judge.timeout)  # once per process, not per request: untimed
        t0 = time.perf_counter()
        stats = await judge_files([pairs], [out], settings, client=client, log=lambda m: None)
        dt = time.perf_counter() - t0
        await client.close()
        return stats, dt

    stats, dt = asyncio.run(run())
    if stats.files[0].errors or stats.files[0].judged == 0:
        raise RuntimeError(f"benchmark run failed: {stats}")
    return dt, stats.requests


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=128, help="pairs to judge per run (default: 128)")
    p.add_argument("--latency", type=float, default=0.2, help="fake server latency per request, s (default: 0.2)")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent run's requests in flight (default: 32)")
    args = p.parse_args(argv)
    importlib.import_module("openai")  # up front: its ~1 s import is not judging throughput

    proc, url = start_fake_server(args.latency)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            pairs = Path(tmp) / "pairwise.jsonl"
            make_pairs(pairs, args.requests)
            rates = {}
            for c in (1, args.concurrency):
                dt, n = measure(pairs, Path(tmp) / f"judged_c{c}.jsonl", url, c)
                rates[c] = n / dt
                print(f"concurrency {c:>3}: {n} requests in {dt:6.2f} s -> {rates[c]:7.1f} requests/s")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    ratio = rates[args.concurrency] / rates[1]
    print(f"speed-up at concurrency {args.concurrency}: {ratio:.1f}x (latency {1000 * args.latency:.0f} ms/request)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
