"""`ctcompare serve [ROOT]`: serve report folders read-only over HTTP on loopback (the server: flows/serve.py)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from flows.cli.errors import EXIT_OK, UsageError
from flows.serve import BASE_URL_ENV, DEFAULT_HOST, DEFAULT_PORT, make_server, server_url, serving


def _run_serve(args: argparse.Namespace) -> int:
    """Serve ROOT until interrupted; the last line printed is the address of its index."""
    try:
        server = make_server(Path(args.root), args.host, args.port, access_log=args.access_log)
    except ValueError as error:
        raise UsageError(str(error)) from None
    except OSError as error:
        raise UsageError(f"cannot listen on {args.host}:{args.port} ({error.strerror}); "
                         "choose another --port.") from None
    # Ctrl-C stops it even when started with SIGINT ignored (a background job of a non-interactive shell inherits
    # that, and Python keeps an ignored SIGINT ignored): a server meant to be stopped with Ctrl-C takes it back.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `make server` stops it so: the record goes too
    with serving(server):
        print(f"Serving {Path(args.root).resolve()} read-only (Ctrl-C to stop). Reports: {server_url(server)}",
              flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("ctcompare serve: stopped.", file=sys.stderr)
    return EXIT_OK


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `serve` sub-command."""
    parser = subparsers.add_parser(
        "serve",
        help="serve the reports under a folder read-only over HTTP on loopback",
        description="Serve the reports under ROOT read-only over HTTP on a loopback address, so that report links in "
        "the Prefect UI open in a browser (`make server` starts it over out/reports). Served: index.html files and, "
        "in each report folder, the report, its appendix, results.json, figures and model cards; nothing else (no "
        "DICOM file, CSV, package, dataset or private/ folder). A folder that holds no report is refused.",
        epilog=f"{BASE_URL_ENV}: base URL at which the reports folder is published; when set, report links point "
        "there instead of at a running server.",
    )
    parser.add_argument("root", nargs="?", default=".", help="the folder holding the report folders (default: the "
                        "current folder), e.g. out/reports")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"TCP port, 0 for any free one (default {DEFAULT_PORT})")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"loopback address to listen on (default {DEFAULT_HOST})")
    parser.add_argument("--access-log", action="store_true", help="print one line per request on stderr (method, "
                        "path, status; a refused path is never printed)")
    parser.set_defaults(handler=_run_serve)
