"""Database URLs as users write them: the drivers the extras install, and a
missing driver named with its extra when the middleware is built."""

from __future__ import annotations

import pytest

from deferred_middleware import DeferredMiddleware
from deferred_middleware._jobs import Status
from deferred_middleware.store import SQLJobStore
from deferred_middleware.store._urls import database_url

from .support import MYSQL_URL, POSTGRES_URL, require


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("postgres://u:pw@db.example.com/app", "postgresql+psycopg://u:pw@db.example.com/app"),
        ("postgresql://db.example.com/app", "postgresql+psycopg://db.example.com/app"),
        ("postgresql+psycopg://db.example.com/app", "postgresql+psycopg://db.example.com/app"),
        ("mysql://root@db.example.com/app", "mysql+pymysql://root@db.example.com/app"),
        ("mariadb://db.example.com/app", "mariadb+pymysql://db.example.com/app"),
        ("sqlite:///jobs.db", "sqlite:///jobs.db"),
        ("sqlite://", "sqlite://"),
    ],
)
def test_urls_point_at_the_drivers_the_extras_install(given, used):
    assert database_url(given).render_as_string(hide_password=False) == used


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (
            "postgresql+psycopg2://db.example.com/app",
            "needs the driver 'psycopg2', which is not installed; "
            "pip install 'deferred-middleware[postgres]' and use postgresql://",
        ),
        (
            "mysql+mysqldb://db.example.com/app",
            "needs the driver 'MySQLdb', which is not installed; "
            "pip install 'deferred-middleware[mysql]' and use mysql://",
        ),
    ],
)
def test_a_missing_driver_is_named_with_its_extra_when_the_middleware_is_built(given, message):
    with pytest.raises(ImportError) as missing:
        DeferredMiddleware(lambda *a: None, database_url=given)
    assert message in str(missing.value)


def test_a_missing_driver_hides_the_password():
    with pytest.raises(ImportError) as missing:
        database_url("postgresql+psycopg2://u:s3cret@db.example.com/app")
    assert "s3cret" not in str(missing.value)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("jobs.db", "is not a database URL"),
        ("nosuchdb://host/x", "no such database or driver"),
    ],
)
def test_what_is_not_a_database_url_says_so(given, message):
    with pytest.raises(ValueError, match=message):
        database_url(given)


@pytest.mark.parametrize(
    "scheme",
    [
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("mysql", marks=pytest.mark.mysql),
    ],
)
def test_the_short_schemes_reach_the_real_servers(scheme):
    real = require(POSTGRES_URL if scheme == "postgres" else MYSQL_URL, scheme)
    store = SQLJobStore(scheme + "://" + real.partition("://")[2])
    try:
        store.migrate()
        assert store.count(Status.QUEUED) >= 0
    finally:
        store.close()
