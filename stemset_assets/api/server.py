"""Serving the web API and page on uvicorn (`stemset api serve`, :mod:`stemset_assets.cli.api`).

The token is ``api.token`` (``$STEMSET_API_TOKEN``). With ``api.auth: false`` the API needs no
token, and then it serves only on a loopback address; a non-loopback bind always needs a token.
"""

from __future__ import annotations

import ipaddress
import logging

import uvicorn

from gpu_worker.errors import StemsetError

from ..config import StemsetConfig
from ..defs.resources.media_store import open_store
from ..defs.runs import dagster_instance
from ..defs.webserver import WebserverClient
from .app import ApiConfigError, create_app
from .jobs import JobManager


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
        raise ApiConfigError(
            "The web API needs a token: api.auth is true but api.token is empty.",
            "Export STEMSET_API_TOKEN (api.token in config.yaml); for local use only, "
            "set api.auth: false and serve on 127.0.0.1.",
        )
    if not auth and not is_loopback(host):
        raise ApiConfigError(
            f"Refusing to serve the web API on {host} without a token (api.auth is false).",
            "Serve on 127.0.0.1, or set api.auth: true and STEMSET_API_TOKEN.",
        )


def build_app(config: StemsetConfig, *, host: str = "127.0.0.1", resources: dict | None = None):
    """The app for ``config``: its media store, its Dagster instance, jobs through the configured
    webserver (which must answer) or in this process."""
    check_bind(host, config.api.token, config.api.auth)
    store = open_store(config)
    instance = dagster_instance(config)
    webserver = None
    if config.dagster.webserver_url:
        webserver = WebserverClient(config.dagster.webserver_url)
        if not webserver.reachable():
            raise StemsetError(
                f"The Dagster webserver at {config.dagster.webserver_url} does not answer.",
                "Start it (`stemset dev`), or unset DAGSTER_WEBSERVER_URL to run jobs in-process.",
            )
    jobs = JobManager(config, instance, store, webserver=webserver, resources=resources)
    return create_app(config, store=store, instance=instance, jobs=jobs, token=config.api.token, auth=config.api.auth)


def serve(config: StemsetConfig, *, host: str, port: int) -> None:
    """Serve the app for ``config`` on ``host:port`` until interrupted."""
    app = build_app(config, host=host)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    auth = "bearer token required" if config.api.auth else "NO AUTH (local use)"
    print(f"Stemset API on http://{host}:{port}/ ({auth})", flush=True)
    # uvicorn's access log prints paths only (never headers), so the token stays out of logs.
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
