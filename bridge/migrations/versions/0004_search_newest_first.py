"""PostgreSQL: an index that lists messages newest first, so that a search for a common word stops at
the page's end instead of sorting every match (the planner picks it or the GIN index by the words'
frequencies). SQLite walks its FTS5 rowids in that order already.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE INDEX ix_messages_search_newest ON messages (created_ms DESC, message_id DESC)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP INDEX ix_messages_search_newest")
