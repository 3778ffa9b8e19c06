"""Time `mamballama --help` (fresh process each run) and print the median. Usage: python benchmarks/cli_startup.py [N]"""

import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main(n: int = 10) -> None:
    exe = shutil.which("mamballama") or str(Path(sys.executable).parent / "mamballama")
    times = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run([exe, "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    print(f"mamballama --help: median {statistics.median(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms "
          f"over {n} runs ({platform.processor() or platform.machine()}, {shutil.os.cpu_count()} cores, "
          f"Python {platform.python_version()})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
