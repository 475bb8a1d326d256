"""`ctcompare serve [ROOT]`: report folders over HTTP, read-only, on loopback; and the address a report is linked at.

A browser refuses the file:// links a worker would otherwise write into the Prefect UI, so report folders are
served over HTTP instead, in one of two ways:

- `ctcompare serve ROOT` (or `scripts/prefect_local.sh serve`) serves ROOT on http://127.0.0.1:8765/ with the
  standard library's http.server: GET and HEAD only, nothing outside ROOT (no `..`, no symbolic link out of it),
  never a `private/` folder, a hidden file or a weights / checkpoint / key file, no directory listings. While it
  runs it records its address in ROOT/.ctcompare-serve.json, where report_url finds it.
- Setting CTCOMPARE_REPORT_BASE_URL: the base URL of a shared web location that mirrors the reports root (for
  example https://intranet.example/ctcompare/ when the reports root is published there). It wins over a running
  `ctcompare serve`.

report_url(report_html, root) is what flows link their report with: the shared location when the setting is set,
else the address of a `ctcompare serve` running on this machine over ROOT (or a folder above it), else the file URI.
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

BASE_URL_ENV = "CTCOMPARE_REPORT_BASE_URL"
SERVE_RECORD_FILE = ".ctcompare-serve.json"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
# Never served, wherever they lie under ROOT: the private half of a dataset, and files that are weights, model
# checkpoints, keys or locks (they can carry what the report leaves out, and nobody reads them in a browser).
REFUSED_FOLDERS = frozenset({"private"})
REFUSED_SUFFIXES = frozenset({".pt", ".pth", ".ckpt", ".key", ".lock"})


def is_refused(relative: PurePosixPath) -> bool:
    """True for a path under ROOT that is never served: a parent step, a hidden or private part, a weights file."""
    parts = relative.parts
    if any(part in ("", ".", "..") or part.startswith(".") for part in parts):
        return True
    if any(part.lower() in REFUSED_FOLDERS for part in parts):
        return True
    return bool(parts) and PurePosixPath(parts[-1]).suffix.lower() in REFUSED_SUFFIXES


class ReportRequestHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files under one root folder, read-only (GET and HEAD); everything refused answers 404."""

    server_version = "ctcompare-serve"

    def send_head(self):  # type: ignore[no-untyped-def]
        """Refuse any path that is_refused, or that resolves outside the root, before the standard handler runs."""
        if not self._allowed():
            self.send_error(404, "Not found")
            return None
        return super().send_head()

    def _allowed(self) -> bool:
        """The requested path, as asked and as resolved (symbolic links followed), lies inside the root and is not refused."""
        root = Path(self.directory).resolve()
        asked = PurePosixPath(*[part for part in unquote(urlsplit(self.path).path).split("/") if part])
        try:
            target = Path(self.translate_path(self.path)).resolve()
        except (OSError, ValueError):  # e.g. an embedded NUL byte
            return False
        if is_refused(asked) or not (target == root or root in target.parents):
            return False
        return not is_refused(PurePosixPath(target.relative_to(root).as_posix()))

    def list_directory(self, path):  # type: ignore[no-untyped-def]
        """No listings: a folder is served only through its index.html."""
        self.send_error(404, "Not found")
        return None

    def end_headers(self) -> None:
        """Reports may change on a re-run: never cached; never sniffed into another type."""
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        super().end_headers()


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
    """

    daemon_threads = True  # a slow browser never keeps the process alive after Ctrl-C

    def __init__(self, address: tuple[str, int], root: Path) -> None:
        self.root = root
        super().__init__(address, functools.partial(ReportRequestHandler, directory=str(root)))


class ReportServerV6(ReportServer):
    """ReportServer on an IPv6 loopback address (::1)."""

    address_family = socket.AF_INET6


def make_server(root: Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> ReportServer:
    """A bound (not yet serving) HTTP server over root on a loopback address; port 0 picks a free port.

    Raises ValueError (one sentence) for a missing root, a non-loopback host or a port out of range; OSError when
    the port is taken.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(f"reports folder {root} does not exist or is not a folder.")
    check_loopback(host)
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port} is out of range; valid ports: 1 to 65535 (0 picks a free one).")
    server_class = ReportServerV6 if ":" in host else ReportServer
    return server_class((host, port), root.resolve())


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
        print(f"ctcompare serve: could not record the address in {record} ({error.strerror}); report links stay file:// "
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
    """The URL recorded in folder/.ctcompare-serve.json by a `ctcompare serve` still running on this machine, else None."""
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
    """The address to link a report at: CTCOMPARE_REPORT_BASE_URL + its path below root when the setting is set;
    else the address of a `ctcompare serve` running on this machine over root or a folder above it; else file://."""
    target, root = Path(report_html).resolve(), Path(root).resolve()
    base = report_base_url()
    if base is not None and (url := _url_under(base, root, target)) is not None:
        return url
    for folder in (root, *root.parents):
        served = served_base(folder)
        if served is not None and (url := _url_under(served, folder, target)) is not None:
            return url
    return target.as_uri()
