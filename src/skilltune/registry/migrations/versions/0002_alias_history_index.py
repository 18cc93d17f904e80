"""Rollback and `registry history` read one alias's events in order: index (name, alias, id).

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_alias_events_name_alias_id", "alias_events", ["name", "alias", "id"])


def downgrade() -> None:
    op.drop_index("ix_alias_events_name_alias_id", table_name="alias_events")
