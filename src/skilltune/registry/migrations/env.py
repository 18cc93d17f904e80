"""Alembic environment: skilltune passes the connection in; nothing here reads a config file or a URL."""

from alembic import context

from skilltune.registry.db import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
