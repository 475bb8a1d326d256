"""Start-up of a `ctcompare` command with the project's Prefect server running and without one, side by side.

    .venv/bin/python benchmarks/startup.py [--repeats 3] [--images 1500] [--size 224]

Runs `ctcompare cost --images N --size S` (the issue's command) as a user would, from one working folder whose
calibration is cached (a first, uncounted run calibrates), in two set-ups:

- temporary API: PREFECT_HOME holds no server file, so Prefect starts its temporary (ephemeral) API server;
- project server: a real `prefect server` started the way `make server` starts it (scripts/prefect_local.sh, which
  records its address in PREFECT_HOME), so the command finds and uses it (no PREFECT_API_URL is set).

Each run is timed from the moment the process is started to: its first line from the flow run ("Beginning flow
run": the command has started), and its exit (wall). Two kinds of runs: into a new --out folder (the cost is
counted: FLOPs on the meta device and activation memory), and again into the same folder (cost.json is reused).
The floor is printed too: `python -c "import prefect"` (the part of start-up that is Prefect's own import), and
`ctcompare --help` (no Prefect at all). Medians of --repeats runs; the load (uptime) before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.prefect_server import PrefectStack  # noqa: E402  (the real-server helper the tests use)

CTCOMPARE = [sys.executable, "-m", "flows.cli"]
STARTED_LINE = "Beginning flow run"


def load() -> str:
    return os.getloadavg().__repr__()


def timed_command(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[float | None, float, str]:
    """(seconds to the flow run's first line or None, seconds to exit, output) of one command."""
    started = time.perf_counter()
    process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               stdin=subprocess.DEVNULL, bufsize=1)
    first: float | None = None
    lines = []
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        if first is None and STARTED_LINE in line:
            first = time.perf_counter() - started
    process.wait()
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {process.returncode}:\n{''.join(lines)[-3000:]}")
    return first, wall, "".join(lines)


def user_env(prefect_home: Path, work: Path) -> dict[str, str]:
    """A user's shell: this checkout on the path, no PREFECT_API_URL, state in prefect_home."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(PYTHONPATH=str(ROOT), PREFECT_HOME=str(prefect_home), MPLCONFIGDIR=str(work / "mpl"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", COLUMNS="200")
    return env


def measure(label: str, cost_argv: list[str], work: Path, env: dict[str, str], repeats: int) -> dict[str, float]:
    """Median start and wall of `repeats` cost runs into new folders and into the same folder again."""
    fresh_start, fresh_wall, again_start, again_wall = [], [], [], []
    for i in range(repeats):
        out = work / f"out-{label.replace(' ', '-')}-{i}"
        start, wall, output = timed_command([*cost_argv, "--out", str(out)], work, env)
        if start is None:
            raise RuntimeError(f"no '{STARTED_LINE}' line:\n{output[-2000:]}")
        fresh_start.append(start)
        fresh_wall.append(wall)
        start, wall, _ = timed_command([*cost_argv, "--out", str(out)], work, env)
        again_start.append(start or wall)
        again_wall.append(wall)
    return {
        "new folder: start": statistics.median(fresh_start),
        "new folder: wall": statistics.median(fresh_wall),
        "cost.json reused: start": statistics.median(again_start),
        "cost.json reused: wall": statistics.median(again_wall),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    cost_argv = [*CTCOMPARE, "cost", "--images", str(args.images), "--size", str(args.size)]

    with tempfile.TemporaryDirectory(prefix="ctcompare-startup-") as tmp:
        work = Path(tmp)
        print(f"load before: {load()} on {os.cpu_count()} cores")
        no_server_home = work / "prefect-no-server"
        env = user_env(no_server_home, work)
        started = time.perf_counter()
        timed_command([*cost_argv, "--out", str(work / "calibrating")], work, env)  # calibrates once (cached)
        print(f"calibration run (not counted): {time.perf_counter() - started:.1f} s")

        floor = statistics.median(
            timed_command([sys.executable, "-c", "import prefect"], work, env)[1] for _ in range(args.repeats)
        )
        helps = statistics.median(timed_command([*CTCOMPARE, "--help"], work, env)[1] for _ in range(args.repeats))
        temporary = measure("temporary", cost_argv, work, env, args.repeats)

        with PrefectStack(work / "stack") as stack:
            stack.start_server()
            server_env = user_env(Path(stack.env["PREFECT_HOME"]), work)
            _, _, output = timed_command([*cost_argv, "--out", str(work / "server-check")], work, server_env)
            if "127.0.0.1:" + str(stack.port) not in output:
                raise RuntimeError(f"the command did not use the project server:\n{output[-2000:]}")
            served = measure("server", cost_argv, work, server_env, args.repeats)

        print(f"\n`{' '.join(['ctcompare', *cost_argv[3:]])}`, calibration cached; median of {args.repeats} runs, "
              "seconds")
        print(f"{'':28s}{'temporary API':>15s}{'project server':>16s}{'ratio':>8s}")
        for key in temporary:
            print(f"{key:28s}{temporary[key]:15.2f}{served[key]:16.2f}{temporary[key] / served[key]:7.2f}x")
        print(f"\nfloor: `python -c 'import prefect'` {floor:.2f} s; `ctcompare --help` {helps:.2f} s (no Prefect)")
        print(f"start-up target (under 2 s with the project server): "
              f"{'met' if served['new folder: start'] < 2 and served['cost.json reused: start'] < 2 else 'NOT met'}")
        print(f"load after: {load()}")


if __name__ == "__main__":
    main()
