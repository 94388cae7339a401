"""Protocol 1.1: revisions, edits, deletions, reactions, read markers and search.

Existing messages get rev = seq (and each conversation last_rev = last_seq), no edit, no deletion, no
reactions, and are indexed for search. No read marker is invented: every old message starts unread.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from bridge.model import words

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

CHUNK = 1000


def upgrade() -> None:
    bind = op.get_bind()
    pg = bind.dialect.name == "postgresql"
    with op.batch_alter_table("conversations") as batch:
        batch.add_column(sa.Column("last_rev", sa.BigInteger(), nullable=False, server_default="0"))
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("rev", sa.BigInteger(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("edited_ms", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("deleted_ms", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("reactions", sa.Text(), nullable=False, server_default="{}"))
        batch.add_column(sa.Column("search_rowid", sa.BigInteger(), nullable=True))
        batch.add_column(
            sa.Column("search_vector", postgresql.TSVECTOR().with_variant(sa.Text(), "sqlite"), nullable=True)
        )
    op.execute("UPDATE conversations SET last_rev = last_seq")
    op.execute("UPDATE messages SET rev = seq")
    op.create_index("uq_messages_rev", "messages", ["conversation_id", "rev"], unique=True)
    op.create_index("uq_messages_search_rowid", "messages", ["search_rowid"], unique=True)
    op.create_table(
        "read_markers",
        sa.Column("conversation_id", sa.String(64), primary_key=True),
        sa.Column("user_id", sa.String(64), primary_key=True),
        sa.Column("read_seq", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_read_markers_user", "read_markers", ["user_id"])
    if not pg:
        op.execute(
            "CREATE VIRTUAL TABLE message_search"
            " USING fts5(words, tokenize = 'unicode61 remove_diacritics 0')"
        )
    _index_existing(bind, pg)
    if pg:
        op.execute("CREATE INDEX ix_messages_search ON messages USING gin (search_vector)")


def _index_existing(bind: sa.engine.Connection, pg: bool) -> None:
    """Indexes every existing message's words, in chunks (keyset on message_id)."""
    last = ""
    while True:
        rows = bind.execute(
            sa.text(
                "SELECT message_id, body, created_ms FROM messages WHERE message_id > :last "
                "ORDER BY message_id LIMIT :n"
            ),
            {"last": last, "n": CHUNK},
        ).all()
        if not rows:
            return
        last = rows[-1][0]
        found = [(mid, " ".join(words(body)), ms) for mid, body, ms in rows]
        found = [(mid, text, ms) for mid, text, ms in found if text]
        if pg:
            if found:
                bind.execute(
                    sa.text(
                        "UPDATE messages SET search_vector = to_tsvector('simple'::regconfig, :words) "
                        "WHERE message_id = :mid"
                    ),
                    [{"mid": mid, "words": text} for mid, text, _ in found],
                )
            continue
        for mid, text, ms in found:  # rowid: created_ms * 4096 + order within the millisecond (as bridge.sql)
            rowid = bind.execute(
                sa.text(
                    "INSERT INTO message_search(rowid, words) VALUES (coalesce((SELECT max(rowid) + 1 FROM "
                    "message_search WHERE rowid BETWEEN :lo AND :lo + 4095), :lo), :words)"
                ),
                {"words": text, "lo": ms << 12},
            ).lastrowid
            bind.execute(
                sa.text("UPDATE messages SET search_rowid = :r WHERE message_id = :mid"),
                {"r": rowid, "mid": mid},
            )


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.drop_index("ix_messages_search", table_name="messages")
    else:
        op.execute("DROP TABLE message_search")
    op.drop_table("read_markers")
    op.drop_index("uq_messages_search_rowid", table_name="messages")
    op.drop_index("uq_messages_rev", table_name="messages")
    with op.batch_alter_table("messages") as batch:
        for name in ("search_vector", "search_rowid", "reactions", "deleted_ms", "edited_ms", "rev"):
            batch.drop_column(name)
    with op.batch_alter_table("conversations") as batch:
        batch.drop_column("last_rev")
