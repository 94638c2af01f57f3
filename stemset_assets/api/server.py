"""`stemset api serve`: the web API and page on uvicorn.

The token is ``api.token`` (``$STEMSET_API_TOKEN``). With ``api.auth: false`` the API needs no
token, and then it serves only on a loopback address; a non-loopback bind always needs a token.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging

from gpu_worker.errors import StemsetError

from .app import ApiConfigError, create_app
from .jobs import JobManager

DEFAULT_PORT = 8080


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None, auth: bool) -> None:
    """Refuse what would expose the API: auth on without a token, or no auth off loopback."""
    if auth and not token:
        raise ApiConfigError("The web API needs a token: api.auth is true but api.token is empty.",
                             "Export STEMSET_API_TOKEN (api.token in config.yaml); for local use only, "
                             "set api.auth: false and serve on 127.0.0.1.")
    if not auth and not is_loopback(host):
        raise ApiConfigError(f"Refusing to serve the web API on {host} without a token (api.auth is false).",
                             "Serve on 127.0.0.1, or set api.auth: true and STEMSET_API_TOKEN.")


def build_app(config, *, host: str = "127.0.0.1", resources: dict | None = None):
    """The app for ``config``: its media store, its Dagster instance, jobs through the configured
    webserver (which must answer) or in this process."""
    from ..intake import open_store
    from ..runs import WebserverClient, dagster_instance

    check_bind(host, config.api.token, config.api.auth)
    store = open_store(config)
    instance = dagster_instance(config)
    webserver = None
    if config.dagster.webserver_url:
        webserver = WebserverClient(config.dagster.webserver_url)
        if not webserver.reachable():
            raise StemsetError(f"The Dagster webserver at {config.dagster.webserver_url} does not answer.",
                               "Start it (`stemset dev`), or unset DAGSTER_WEBSERVER_URL to run jobs in-process.")
    jobs = JobManager(config, instance, store, webserver=webserver, resources=resources)
    return create_app(config, store=store, instance=instance, jobs=jobs, token=config.api.token, auth=config.api.auth)


def add_api_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="api_command", metavar="ACTION", required=True)
    serve = sub.add_parser("serve", help="serve the upload/jobs API and the player page")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")


def run_api(args: argparse.Namespace) -> int:
    """The web API and player page: `stemset api serve [--host 127.0.0.1] [--port 8080]`."""
    import uvicorn

    from ..config import load_config

    config = load_config(args.config)
    app = build_app(config, host=args.host)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    auth = "bearer token required" if config.api.auth else "NO AUTH (local use)"
    print(f"Stemset API on http://{args.host}:{args.port}/ ({auth})", flush=True)
    # uvicorn's access log prints paths only (never headers), so the token stays out of logs.
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    return 0
