"""Dagster's Postgres storage with one connection kept open per store.

``dagster_postgres`` opens a new connection for every read and write outside the webserver (its
engines use SQLAlchemy's ``NullPool``; only ``dagster-webserver`` calls ``optimize_for_webserver``
to keep one). A connection costs a TCP handshake, a server process fork and password
authentication (SCRAM: ~12 ms, 7 ms of it client CPU, on the 2-core test machine), and the daemon
creating a backfill's runs makes a few hundred of them per run, so run creation crawled at about
one run every 4 s. :class:`PooledPostgresStorage` is the same storage with each of its three
stores set up as the webserver sets them up (one pooled connection, recycled hourly), without a
statement timeout, and with no cap on extra connections: a thread that finds the pooled one busy
opens and closes its own, as every call did before, so nothing waits on the pool.

``deploy/dagster.yaml`` names it (``storage: custom``); the Postgres settings are Dagster's own.
"""

from __future__ import annotations

from dagster._core.storage.config import PostgresStorageConfig
from dagster._serdes import ConfigurableClassData
from dagster_postgres import DagsterPostgresStorage
from dagster_postgres.utils import get_token_provider_from_config, pg_url_from_config

POOL_RECYCLE_S = 3600  # reconnect hourly: servers and proxies drop idle connections eventually
NO_STATEMENT_TIMEOUT = 0  # the webserver's 15 s would cut a daemon's long backfill queries
NO_OVERFLOW_CAP = -1


class PooledPostgresStorage(DagsterPostgresStorage):
    """:class:`dagster_postgres.DagsterPostgresStorage`, keeping one connection per store open."""

    def __init__(self, postgres_url: str, should_autocreate_tables: bool = True, inst_data=None, token_provider=None):
        super().__init__(postgres_url, should_autocreate_tables, inst_data, token_provider)
        for store in (self.run_storage, self.event_log_storage, self.schedule_storage):
            store.optimize_for_webserver(
                statement_timeout=NO_STATEMENT_TIMEOUT, pool_recycle=POOL_RECYCLE_S, max_overflow=NO_OVERFLOW_CAP
            )

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData | None, config_value: PostgresStorageConfig
    ) -> PooledPostgresStorage:
        return cls(
            inst_data=inst_data,
            postgres_url=pg_url_from_config(config_value),
            should_autocreate_tables=config_value.get("should_autocreate_tables", True),
            token_provider=get_token_provider_from_config(config_value),
        )
