"""Tests of `ctcompare serve` and report_url: a real HTTP server on an ephemeral loopback port, real requests."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.serve import (
    BASE_URL_ENV,
    SERVE_RECORD_FILE,
    ReportServer,
    make_server,
    report_url,
    server_url,
    serving,
)

REPORT_TEXT = "<html><body>the report</body></html>"
SECRET = "patient 12345 secret"


@pytest.fixture()
def reports_root(tmp_path: Path) -> Path:
    """tmp/reports with one report folder, private and weights files beside it, and secrets outside it."""
    (tmp_path / "outside.txt").write_text(SECRET, encoding="utf-8")
    root = tmp_path / "reports"
    run = root / "trial 1"
    (run / "figures").mkdir(parents=True)
    (run / "report.html").write_text(REPORT_TEXT, encoding="utf-8")
    (run / "results.json").write_text("{}", encoding="utf-8")
    (run / "figures" / "roc.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (run / "runs" / "scratch" / "main" / "package").mkdir(parents=True)
    (run / "runs" / "scratch" / "main" / "package" / "MODEL_CARD.md").write_text("# card", encoding="utf-8")
    (root / "index.html").write_text("<html>index</html>", encoding="utf-8")
    for private in (run / "dataset" / "private" / "index.csv", run / "private" / "hmac.key", run / "runs" / "best.pt",
                    run / "weights.pth", run / ".hidden", run / "dataset" / "dataset.json", run / "splits.csv",
                    run / "runs" / "scratch" / "main" / "package" / "model.pt", root / "labels.csv",
                    root / "cohort" / "dicom" / "PAT12345" / "1.dcm", root / "cohort" / "index.html",
                    run / "runs" / "scratch" / "main" / "test_predictions.csv", run / "notes.txt"):
        private.parent.mkdir(parents=True, exist_ok=True)
        private.write_text(SECRET, encoding="utf-8")
    (root / "link-out").symlink_to(tmp_path)  # a symbolic link that leads out of the root
    (run / "shortcut").symlink_to(run / "private")  # and one into a private folder
    return root


@pytest.fixture()
def server(reports_root: Path) -> Iterator[ReportServer]:
    """A running server on an ephemeral loopback port, its address recorded in the root."""
    server = make_server(reports_root, "127.0.0.1", 0)
    with serving(server):
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield server
        finally:
            server.shutdown()
            thread.join(timeout=30)


def _get(server: ReportServer, path: str, method: str = "GET") -> tuple[int, bytes]:
    """Status and body of one request, the path sent exactly as given (no client-side normalisation)."""
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(str(host), port, timeout=30)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_serves_reports_and_nothing_else(server: ReportServer) -> None:
    status, body = _get(server, "/trial%201/report.html")
    assert status == 200 and body.decode() == REPORT_TEXT
    assert _get(server, "/trial%201/figures/roc.png")[0] == 200
    assert _get(server, "/trial%201/results.json")[0] == 200
    assert _get(server, "/trial%201/runs/scratch/main/package/MODEL_CARD.md")[0] == 200
    assert _get(server, "/")[1] == b"<html>index</html>"
    refused = [
        # not a report file: DICOM, CSV in or out of a report, a package's model, a dataset, an index of no report
        "/cohort/dicom/PAT12345/1.dcm",
        "/labels.csv",
        "/trial%201/splits.csv",
        "/trial%201/notes.txt",
        "/trial%201/runs/scratch/main/test_predictions.csv",
        "/trial%201/runs/scratch/main/package/model.pt",
        "/trial%201/dataset/dataset.json",
        "/cohort/index.html",
        "/cohort/",
        "/../outside.txt",
        "/%2e%2e/outside.txt",
        "/trial%201/../../outside.txt",
        "/trial%201/%2E%2E/%2E%2E/outside.txt",
        "/link-out/outside.txt",  # symbolic link out of the root
        "/trial%201/private/hmac.key",
        "/trial%201/dataset/private/index.csv",
        "/trial%201/PRIVATE/hmac.key",
        "/trial%201/shortcut/hmac.key",  # symbolic link into a private folder
        "/trial%201/runs/best.pt",
        "/trial%201/weights.pth",
        "/trial%201/.hidden",
        f"/{SERVE_RECORD_FILE}",
        "/trial%201/",  # no directory listings
        "/trial%201/report.html%00.txt",
    ]
    for path in refused:
        status, body = _get(server, path)
        assert status in (403, 404), (path, status)
        assert SECRET.encode() not in body, path


def test_read_only(server: ReportServer) -> None:
    for method in ("POST", "PUT", "DELETE"):
        assert _get(server, "/trial%201/report.html", method)[0] == 501
    assert (server.root / "trial 1" / "report.html").read_text(encoding="utf-8") == REPORT_TEXT


def test_report_url_follows_the_running_server(server: ReportServer, reports_root: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BASE_URL_ENV, raising=False)
    report = reports_root / "trial 1" / "report.html"
    url = report_url(report, reports_root)
    assert url == server_url(server) + "trial%201/report.html" and url.startswith("http://127.0.0.1:")
    # a flow whose index root is a folder below the served one finds the same server
    assert report_url(report, reports_root / "trial 1") == url
    host, port = server.server_address[:2]
    assert _get(server, url.split(f"{port}", 1)[1])[0] == 200


def test_report_url_without_server_or_with_a_base_url(reports_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BASE_URL_ENV, raising=False)
    report = reports_root / "trial 1" / "report.html"
    assert report_url(report, reports_root) == report.resolve().as_uri()
    # a record left by a server that was killed (its process is gone) is ignored
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    (reports_root / SERVE_RECORD_FILE).write_text(
        f'{{"url": "http://127.0.0.1:9/", "pid": {int(gone.stdout)}, "hostname": "{socket.gethostname()}"}}',
        encoding="utf-8",
    )
    assert report_url(report, reports_root).startswith("file://")
    monkeypatch.setenv(BASE_URL_ENV, "https://intranet.example/ctcompare")
    assert report_url(report, reports_root) == "https://intranet.example/ctcompare/trial%201/report.html"
    monkeypatch.setenv(BASE_URL_ENV, "intranet/ctcompare")
    with pytest.raises(ValueError, match=BASE_URL_ENV):
        report_url(report, reports_root)


def test_record_is_removed_when_the_server_stops(reports_root: Path) -> None:
    server = make_server(reports_root, "127.0.0.1", 0)
    with serving(server):
        assert (reports_root / SERVE_RECORD_FILE).is_file()
    assert not (reports_root / SERVE_RECORD_FILE).exists()


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "example.org"])
def test_refuses_a_non_loopback_host(reports_root: Path, host: str) -> None:
    with pytest.raises(ValueError, match="127.0.0.1"):
        make_server(reports_root, host, 0)


def _cli(*args: str, cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # Through the imported module, as the installed `ctcompare` script runs it (under `python -m flows.cli`, main()
    # would catch the __main__ copy of UsageError, not the one flows.serve raises).
    entry = "import sys; from flows.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", entry, "serve", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_cli_refuses_bad_arguments_in_one_sentence(tmp_path: Path) -> None:
    for args in (["missing-folder"], [".", "--host", "0.0.0.0"], [".", "--port", "70000"]):
        process = _cli(*args, cwd=tmp_path)
        out, err = process.communicate(timeout=120)
        assert process.returncode == 2, (args, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_cli_serves_until_stopped(reports_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BASE_URL_ENV, raising=False)
    process = _cli(str(reports_root), "--port", "0", cwd=tmp_path)
    try:
        line = process.stdout.readline() if process.stdout else ""
        assert "Reports: http://127.0.0.1:" in line, (
            line,
            process.stderr.read() if process.poll() is not None and process.stderr else "",
        )
        base = line.rsplit("Reports: ", 1)[1].strip()
        port = int(base.rsplit(":", 1)[1].strip("/"))
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("GET", "/trial%201/report.html")
        assert connection.getresponse().read().decode() == REPORT_TEXT
        connection.close()
        assert report_url(reports_root / "trial 1" / "report.html", reports_root) == base + "trial%201/report.html"
        process.send_signal(signal.SIGINT)  # Ctrl-C: stops cleanly and removes its address record
        assert process.wait(timeout=60) == 0
        assert not (reports_root / SERVE_RECORD_FILE).exists()
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=60)


def test_a_folder_without_a_report_is_refused_and_an_empty_one_served(tmp_path: Path) -> None:
    cohort = tmp_path / "cohort"
    (cohort / "dicom" / "PAT12345").mkdir(parents=True)
    (cohort / "dicom" / "PAT12345" / "1.dcm").write_bytes(b"DICM")
    (cohort / "labels.csv").write_text("patient_id,label\nPAT12345,nodule\n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no report"):
        make_server(cohort, "127.0.0.1", 0)
    empty = tmp_path / "reports"
    empty.mkdir()
    make_server(empty, "127.0.0.1", 0).server_close()  # a fresh reports folder, to be written into


def test_the_access_log_is_opt_in_and_never_names_a_refused_path(reports_root: Path, tmp_path: Path) -> None:
    for extra, expect_lines in (([], False), (["--access-log"], True)):
        process = _cli(str(reports_root), "--port", "0", *extra, cwd=tmp_path)
        try:
            line = process.stdout.readline() if process.stdout else ""
            port = int(line.rsplit("Reports: ", 1)[1].strip().rsplit(":", 1)[1].strip("/"))
            for path in ("/trial%201/report.html", "/cohort/dicom/PAT12345/1.dcm"):
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                connection.request("GET", path)
                connection.getresponse().read()
                connection.close()
            process.send_signal(signal.SIGINT)
            _, err = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=60)
        assert "PAT12345" not in err, err
        assert ("/trial%201/report.html" in err) is expect_lines, err
