"""How long a command takes to refuse an output in a missing bucket (the goal: under 10 s, before
Ray starts or a model loads). Starts a moto S3 server on 127.0.0.1 and runs, as a user would,
`r2f run --out`, `r2f extract --store` and `r2f rerank --results` into a bucket that does not exist;
prints each command's wall time (process start included), its exit code, and the load average.

    python bench/bench_output_check.py [--repeat 3] [--smoke]
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "demo" / "gardens_point_sample"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commands(missing: str) -> dict[str, list[str]]:
    seq = f"sequence:{SAMPLE}"
    return {
        "run --out": ["run", "--database", f"{seq}/day_right", "--queries", f"{seq}/night_right",
                      "--backbone", "efficientnet-lite0", "--out", f"s3://{missing}/out"],
        "extract --store": ["extract", "--dataset", f"{seq}/day_right", "--backbone", "efficientnet-lite0",
                            "--store", f"s3://{missing}/store"],
        "rerank --results": ["rerank", "--query-store", f"s3://{missing}/q", "--database-store",
                             f"s3://{missing}/db", "--index", f"s3://{missing}/index", "--results",
                             f"s3://{missing}/results"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="one command, once")
    args = parser.parse_args(argv)
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": url, "RAY_ADDRESS": "",
           "PYTHONPATH": str(ROOT)}
    missing = f"r2f-missing-{uuid.uuid4().hex[:8]}"
    todo = commands(missing)
    if args.smoke:
        todo = dict(list(todo.items())[1:2])
    repeat = 1 if args.smoke else args.repeat
    try:
        print(f"refusing an output in a missing bucket ({repeat} run(s) each; load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())})")
        for name, argv_ in todo.items():
            times, codes = [], set()
            for _ in range(repeat):
                t = time.perf_counter()
                proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *argv_], cwd=ROOT, env=env,
                                      capture_output=True, text=True, timeout=300)
                times.append(time.perf_counter() - t)
                codes.add(proc.returncode)
                if missing not in proc.stderr:
                    print(proc.stderr[-2000:])
                    return 1
            print(f"  r2f {name:<18} median {statistics.median(times):5.1f} s  (min {min(times):.1f}, max "
                  f"{max(times):.1f})  exit {sorted(codes)}")
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
