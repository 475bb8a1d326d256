"""A smoke comparison run twice into the same folder, side by side: how much of the first run a re-run repeats.

    PYTHONPATH=. .venv/bin/python benchmarks/rerun.py [--patients 20] [--slices 3] [--keep DIR]

A synthetic cohort (tasks.demo.synth) and a torchvision-format ResNet-50 weights file (random weights: the cost of
a run does not depend on their values) are written to a temporary folder. Then `ctcompare compare COHORT --labels
... --out REPORT --profile smoke --weights FILE` (all three default arms, the machine's calibration cached in a
fresh cache folder, so the first run calibrates as a first run on a new machine does) runs as a user would run it,
in a subprocess, twice: the first run ingests, calibrates, trains, evaluates, packages and measures; the re-run
finds every input unchanged. Each run is timed from process start to exit.

Two ways to run it, named in the output: by default no Prefect server runs, so each command starts Prefect's
temporary API server (5-7 s on a quiet machine, beside the command's own start-up; more on a busy one; in both
runs); with --server a Prefect server runs
beforehand as `make server` starts it (`prefect server start`, its address in PREFECT_HOME/ctcompare-server.json,
where the commands look), the way the project is operated, and its start is not part of either run.

Printed: both wall times and their ratio (goal <= 0.15), the first run's `ship-arms` stage and training stage
(their own log lines: "Shipped N arm(s) in X s", "Training stage: N run(s) in X s") and the share of the one in
the other (goal <= 0.20), the load average before and after, and whether both runs gave the same headline.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.weights_files import random_torchvision_file  # noqa: E402  (the weights file the tests use)

RERUN_GOAL, SHIP_SHARE_GOAL = 0.15, 0.20
SHIPPED = re.compile(r"Shipped \d+ arm\(s\) in ([0-9.]+) s")
TRAINED = re.compile(r"Training stage: \d+ run\(s\) in ([0-9.]+) s")
SHIP_PIECES = re.compile(r"([\w-]+: package, deployment cost and MONAI bundle in [0-9.]+ s"
                         r"|the compressed variant and its comparison [0-9.]+ s)")
KEPT = "Nothing the report is made from has changed"


def environment(root: Path) -> dict[str, str]:
    """A user's shell with this checkout on the path; Prefect, matplotlib and the cost caches in `root`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(PYTHONPATH=str(ROOT), PREFECT_HOME=str(root / "prefect"), MPLCONFIGDIR=str(root / "mpl"),
               CTCOMPARE_CACHE_DIR=str(root / "cache"), TORCH_HOME=str(root / "torch"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", CTCOMPARE_HMAC_KEY="benchmark-key", COLUMNS="200")
    return env


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_project_server(env: dict[str, str], timeout_s: float = 300.0) -> subprocess.Popen:
    """`prefect server start` on a free loopback port (in its own process group), its address recorded in
    PREFECT_HOME/ctcompare-server.json as `make server` records it; returns once /health answers."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    api_url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            stop_project_server(server)
            raise RuntimeError(f"the Prefect server did not answer at {api_url}")
        time.sleep(1)
    home = Path(env["PREFECT_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "ctcompare-server.json").write_text(json.dumps({"api_url": api_url, "pid": server.pid}) + "\n")
    return server


def stop_project_server(server: subprocess.Popen) -> None:
    """End the server's process group (the server and what it started), SIGKILL after 30 s."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    except ProcessLookupError:
        pass


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    """(wall seconds, output) of one command; RuntimeError when it fails."""
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          stdin=subprocess.DEVNULL, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {done.returncode}:\n{done.stdout[-4000:]}")
    return wall, done.stdout


def seconds(pattern: re.Pattern[str], output: str, what: str) -> float:
    """The seconds a stage's own log line states."""
    found = pattern.findall(output)
    if not found:
        raise RuntimeError(f"no {what} line in the output:\n{output[-3000:]}")
    return float(found[-1])


def headline(output: str) -> str:
    """The command's headline: the line printed before its last "Report: ..." line (Prefect's temporary server may
    log after it while stopping)."""
    lines = output.splitlines()
    report = max((i for i, line in enumerate(lines) if line.startswith("Report: ")), default=None)
    return lines[report - 1] if report else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=20)
    parser.add_argument("--slices", type=int, default=3, help="slices per patient")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    parser.add_argument("--server", action="store_true",
                        help="run both against a Prefect server started beforehand, as `make server` runs it")
    args = parser.parse_args(argv)
    root = args.keep.resolve() if args.keep else Path(tempfile.mkdtemp(prefix="ctcompare-rerun-"))
    root.mkdir(parents=True, exist_ok=True)
    from tasks.demo.synth import synthesize_cohort

    cohort = synthesize_cohort(root / "cohort", patients=args.patients, slices_per_patient=args.slices, seed=0)
    command = [sys.executable, "-m", "flows.cli", "compare", str(cohort.dicom_dir), "--labels",
               str(cohort.labels_path), "--out", str(root / "report"), "--profile", "smoke",
               "--weights", str(random_torchvision_file(root)), "--set", "download_weights=false"]
    env = environment(root)
    server = start_project_server(env) if args.server else None
    try:
        load_before = os.getloadavg()
        first, first_output = timed(command, env)
        again, again_output = timed(command, env)
        load_after = os.getloadavg()
    finally:
        if server is not None:
            stop_project_server(server)
    ship, train = seconds(SHIPPED, first_output, "ship-arms"), seconds(TRAINED, first_output, "training stage")
    (root / "first-run.log").write_text(first_output)
    (root / "re-run.log").write_text(again_output)
    kept = KEPT in again_output
    headlines = [headline(output) for output in (first_output, again_output)]
    print(f"cohort: {args.patients} patients x {args.slices} slices, smoke profile, arms scratch, imagenet, "
          f"imagenet-linear; load average before {load_before[0]:.1f}, after {load_after[0]:.1f} ({os.cpu_count()} "
          "CPUs)")
    print("Prefect API: " + ("a project server running beforehand (make server), as the project is operated"
                             if args.server else "none running, so each command starts Prefect's temporary server"))
    print(f"first run     {first:7.1f} s wall (training stage {train:.1f} s, ship-arms {ship:.1f} s)")
    print("ship-arms pieces (first run): " + ("; ".join(SHIP_PIECES.findall(first_output)) or "not logged"))
    print(f"re-run        {again:7.1f} s wall (evaluation, packages and report kept: {kept})")
    print(f"re-run / first run: {again / first:.3f} (goal <= {RERUN_GOAL})")
    print(f"ship-arms / training stage (first run): {ship / train:.3f} (goal <= {SHIP_SHARE_GOAL})")
    print(f"same headline both times: {headlines[0] == headlines[1]}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
