"""Alembic scripts for the job table; run by ``store.migrate`` on first use."""
