"""`ctcompare serve [ROOT]`: the reports under ROOT over HTTP, read-only, on loopback; and the address a report is
linked at.

A browser refuses the file:// links a worker would otherwise write into the Prefect UI, so reports are served over
HTTP instead, in one of two ways:

- `ctcompare serve ROOT` (`make server` starts it beside the Prefect server, over out/reports) serves on
  http://127.0.0.1:8765/ with the standard library's http.server: GET and HEAD only, the reports and nothing else.
  Served: every index.html, and in each report folder (one holding results.json) report.html, report.md, the
  appendix, results.json, figures/ and the model cards the report links. Never anything else (no DICOM file, no
  CSV, no package, no dataset, no `private/` folder, no hidden file), nothing outside ROOT (no `..`, no symbolic
  link out of it), no folder listing. A ROOT that holds no report (and is not empty, as a fresh reports folder
  is) is refused. No access log unless asked for (--access-log), and a refused path is never written to it. While
  it runs it records its address in ROOT/.ctcompare-serve.json, where report_url finds it.
- CTCOMPARE_REPORT_BASE_URL: the base URL at which the reports root is published, by `make server` itself
  (`make worker` sets it to http://127.0.0.1:8765/, so links stay the same whether or not the server runs at the
  moment a report is written) or by a shared web location (e.g. https://intranet.example/ctcompare/). The reports
  root is CTCOMPARE_REPORTS_ROOT when set (`make worker` sets it to out/reports), else the report's index folder.

report_url(report_html, root) is what flows link their report with: the base URL when the report lies under the
reports root, else the address of a `ctcompare serve` running on this machine over root (or a folder above it),
else the file URI.
"""

from __future__ import annotations

import functools
import http.server
import ipaddress
import json
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from urllib.parse import quote, unquote, urlsplit

from data_schemas.files import atomic_write_text
from data_schemas.package import MODEL_CARD_FILE
from data_schemas.report import (
    FIGURES_DIR,
    REPORT_APPENDIX_HTML_FILE,
    REPORT_APPENDIX_MD_FILE,
    REPORT_HTML_FILE,
    REPORT_MD_FILE,
    RESULTS_FILE,
)

BASE_URL_ENV = "CTCOMPARE_REPORT_BASE_URL"
REPORTS_ROOT_ENV = "CTCOMPARE_REPORTS_ROOT"
SERVE_RECORD_FILE = ".ctcompare-serve.json"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
INDEX_FILE = "index.html"
# What a report folder (one holding results.json) serves: the report, its appendix and results, its figures, and
# the model cards it links. Everything else under ROOT answers 404.
REPORT_FILES = frozenset({REPORT_HTML_FILE, REPORT_MD_FILE, REPORT_APPENDIX_HTML_FILE, REPORT_APPENDIX_MD_FILE,
                          RESULTS_FILE})
FIGURE_SUFFIXES = frozenset({".png", ".svg", ".jpg", ".jpeg"})
# Never searched for reports, nor served, wherever they lie under ROOT: the private half of a dataset.
REFUSED_FOLDERS = frozenset({"private"})
REPORT_SEARCH_DEPTH = 4  # ROOT/<group>/<run>/report.html and a little deeper: where comparisons write reports


def is_refused(relative: PurePosixPath) -> bool:
    """True for a path under ROOT that is never served, whatever it holds: a parent step, a hidden or private part."""
    parts = relative.parts
    if any(part in ("", ".", "..") or part.startswith(".") for part in parts):
        return True
    return any(part.lower() in REFUSED_FOLDERS for part in parts)


def _report_folder(root: Path, target: Path) -> Path | None:
    """The nearest folder at or above target's folder, inside root, that holds results.json (a report folder)."""
    for folder in (target.parent, *target.parent.parents):
        if (folder / RESULTS_FILE).is_file():
            return folder
        if folder == root or root not in folder.parents:
            return None
    return None


def is_report_file(root: Path, target: Path) -> bool:
    """True for a file a reader of the reports asks for: the index.html of a folder holding report folders, or in a
    report folder its report, appendix, results.json, a figure or a model card."""
    if target.is_dir():  # a folder is served through its index only
        target = target / INDEX_FILE
    if not target.is_file():
        return False
    if target.name == INDEX_FILE:  # the list of the report folders beside one another (reports.render.update_index)
        return any((child / RESULTS_FILE).is_file() for child in target.parent.iterdir() if child.is_dir())
    folder = _report_folder(root, target)
    if folder is None:
        return False
    inside = PurePosixPath(target.relative_to(folder).as_posix())
    if inside.as_posix() in REPORT_FILES:
        return True
    if inside.parts[0] == FIGURES_DIR and inside.suffix.lower() in FIGURE_SUFFIXES:
        return True
    return inside.name == MODEL_CARD_FILE


def holds_a_report(root: Path, depth: int = REPORT_SEARCH_DEPTH) -> bool:
    """True when a report folder (results.json) lies at most `depth` folders below root (private/ and hidden
    folders not searched), or root is empty (a reports folder not yet written to)."""
    if next(root.iterdir(), None) is None:
        return True
    for folder, subfolders, files in os.walk(root):
        if RESULTS_FILE in files:
            return True
        level = len(Path(folder).relative_to(root).parts)
        subfolders[:] = [] if level >= depth else [
            name for name in subfolders if not name.startswith(".") and name.lower() not in REFUSED_FOLDERS]
    return False


class ReportRequestHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the report files under one root folder, read-only (GET and HEAD); everything else answers 404."""

    server_version = "ctcompare-serve"
    server: ReportServer

    def send_head(self):  # type: ignore[no-untyped-def]
        """Refuse any path that is not a report file inside the root before the standard handler runs."""
        self.served = self._allowed()
        if not self.served:
            self.send_error(404, "Not found")
            return None
        return super().send_head()

    def _allowed(self) -> bool:
        """The requested path, as asked and as resolved (symbolic links followed), lies inside the root, is not
        refused, and is a report file."""
        root = Path(self.directory).resolve()
        asked = PurePosixPath(*[part for part in unquote(urlsplit(self.path).path).split("/") if part])
        try:
            target = Path(self.translate_path(self.path)).resolve()
        except (OSError, ValueError):  # e.g. an embedded NUL byte
            return False
        if is_refused(asked) or not (target == root or root in target.parents):
            return False
        if is_refused(PurePosixPath(target.relative_to(root).as_posix())):
            return False
        try:
            return is_report_file(root, target)
        except (OSError, ValueError):
            return False

    def list_directory(self, path):  # type: ignore[no-untyped-def]
        """No listings: a folder is served only through its index.html."""
        self.send_error(404, "Not found")
        return None

    def end_headers(self) -> None:
        """Reports may change on a re-run: never cached; never sniffed into another type."""
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        super().end_headers()

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """With --access-log only: method, served path (a refused one never: it may name a patient), status."""
        if self.server.access_log:
            path = urlsplit(self.path).path if getattr(self, "served", False) else "(refused)"
            self.log_message("%s %s %s", self.command, path, code)

    def log_error(self, format: str, *args: object) -> None:
        """Errors are answered, not logged: their text can hold the request line."""

    def log_message(self, format: str, *args: object) -> None:
        """A line on stderr, only with --access-log."""
        if self.server.access_log:
            super().log_message(format, *args)


def check_loopback(host: str) -> str:
    """host when it is a loopback address ('localhost', 127.x.x.x, ::1); else ValueError listing the choices."""
    if host == "localhost":
        return host
    try:
        if ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:
        pass
    raise ValueError(f"--host {host!r} is not a loopback address; valid choices: 127.0.0.1 (or any 127.x.x.x), ::1, "
                     f"localhost. To share reports beyond this machine, publish the reports folder on a web server "
                     f"and set {BASE_URL_ENV}.")


class ReportServer(http.server.ThreadingHTTPServer):
    """A threaded HTTP server over one reports folder (IPv4).

    Args:
        address: (host, port) to bind; port 0 picks a free one.
        root: the folder served, resolved.
        access_log: write one line per request to stderr (refused paths left out).
    """

    daemon_threads = True  # a slow browser never keeps the process alive after Ctrl-C

    def __init__(self, address: tuple[str, int], root: Path, access_log: bool = False) -> None:
        self.root, self.access_log = root, access_log
        super().__init__(address, functools.partial(ReportRequestHandler, directory=str(root)))


class ReportServerV6(ReportServer):
    """ReportServer on an IPv6 loopback address (::1)."""

    address_family = socket.AF_INET6


def make_server(root: Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                access_log: bool = False) -> ReportServer:
    """A bound (not yet serving) HTTP server over root's reports on a loopback address; port 0 picks a free port.

    Raises ValueError (one sentence) for a missing root, a root that holds no report, a non-loopback host or a port
    out of range; OSError when the port is taken.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(f"reports folder {root} does not exist or is not a folder.")
    if not holds_a_report(root.resolve()):
        raise ValueError(f"{root} holds no report (no results.json in it or the {REPORT_SEARCH_DEPTH} folder levels "
                         "below); serve the folder that holds your report folders, e.g. out/reports.")
    check_loopback(host)
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port} is out of range; valid ports: 1 to 65535 (0 picks a free one).")
    server_class = ReportServerV6 if ":" in host else ReportServer
    return server_class((host, port), root.resolve(), access_log)


def server_url(server: ReportServer) -> str:
    """'http://127.0.0.1:8765/' for a bound server (IPv6 hosts in brackets)."""
    host, port = server.server_address[:2]
    host = str(host)
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


@contextmanager
def serving(server: ReportServer) -> Iterator[ReportServer]:
    """The server (from make_server) with its address recorded in ROOT/.ctcompare-serve.json while the block runs.

    The caller runs server.serve_forever() (in this thread or another); on exit the server is closed and the record
    removed. A root that cannot be written is served all the same, without the record (report_url then falls back).
    """
    record = server.root / SERVE_RECORD_FILE
    text = json.dumps({"url": server_url(server), "pid": os.getpid(), "hostname": socket.gethostname()})
    try:
        atomic_write_text(record, text + "\n")
    except OSError as error:
        print(f"ctcompare serve: could not record the address in {record} ({error.strerror}); report links stay "
              "file:// "
              f"unless {BASE_URL_ENV} is set.", file=sys.stderr)
    try:
        yield server
    finally:
        server.server_close()
        try:
            if json.loads(record.read_text(encoding="utf-8")).get("pid") == os.getpid():
                record.unlink()
        except (OSError, ValueError):
            pass


def _pid_alive(pid: int) -> bool:
    """True when a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def served_base(folder: Path) -> str | None:
    """The URL recorded in folder/.ctcompare-serve.json by a `ctcompare serve` still running on this machine, else
    None."""
    try:
        record = json.loads((Path(folder) / SERVE_RECORD_FILE).read_text(encoding="utf-8"))
        url, pid, hostname = str(record["url"]), int(record["pid"]), str(record["hostname"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if hostname != socket.gethostname() or not _pid_alive(pid) or not url.startswith("http://"):
        return None  # a server on another machine, or one that is gone (killed without cleaning up)
    return url if url.endswith("/") else url + "/"


def report_base_url() -> str | None:
    """CTCOMPARE_REPORT_BASE_URL with a trailing '/', None when unset; ValueError when it is not an http(s) URL."""
    value = os.environ.get(BASE_URL_ENV, "").strip()
    if not value:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{BASE_URL_ENV}={value!r} is not an http:// or https:// URL with a host.")
    return value if value.endswith("/") else value + "/"


def _url_under(base: str, folder: Path, target: Path) -> str | None:
    """base + the percent-quoted path of target below folder, or None when target is not below folder."""
    try:
        relative = target.relative_to(folder)
    except ValueError:
        return None
    return base + quote(relative.as_posix())


def report_url(report_html: Path, root: Path) -> str:
    """The address to link a report at: CTCOMPARE_REPORT_BASE_URL + its path below the reports root
    (CTCOMPARE_REPORTS_ROOT, else root) when the setting is set; else the address of a `ctcompare serve` running on
    this machine over root or a folder above it; else file://."""
    target, root = Path(report_html).resolve(), Path(root).resolve()
    base = report_base_url()
    published = os.environ.get(REPORTS_ROOT_ENV, "").strip()
    if base is not None and (url := _url_under(base, Path(published).resolve() if published else root, target)):
        return url
    for folder in (root, *root.parents):
        served = served_base(folder)
        if served is not None and (url := _url_under(served, folder, target)) is not None:
            return url
    return target.as_uri()
