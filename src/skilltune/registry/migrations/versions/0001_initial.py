"""The registry schema as skilltune 0.1 created it (versions, aliases, alias_events).

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "versions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), index=True),
        sa.Column("number", sa.Integer),
        sa.Column("created", sa.DateTime),
        sa.Column("note", sa.Text),
        sa.Column("method", sa.String(20)),
        sa.Column("manifest", sa.JSON),
        sa.Column("lineage", sa.JSON),
        sa.Column("metrics", sa.JSON),
        sa.UniqueConstraint("name", "number"),
    )
    op.create_table(
        "aliases",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), index=True),
        sa.Column("alias", sa.String(100)),
        sa.Column("version_id", sa.Integer, sa.ForeignKey("versions.id")),
        sa.UniqueConstraint("name", "alias"),
    )
    op.create_table(
        "alias_events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), index=True),
        sa.Column("alias", sa.String(100)),
        sa.Column("action", sa.String(30)),
        sa.Column("from_number", sa.Integer, nullable=True),
        sa.Column("to_number", sa.Integer, nullable=True),
        sa.Column("who", sa.String(200)),
        sa.Column("when", sa.DateTime),
        sa.Column("reason", sa.Text),
    )


def downgrade() -> None:
    for table in ("alias_events", "aliases", "versions"):
        op.drop_table(table)
