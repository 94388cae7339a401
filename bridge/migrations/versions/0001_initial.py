"""The first released schema: users, sessions, conversations, participants, messages.

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("user_id", sa.String(64), primary_key=True),
        sa.Column("display_name", sa.String(100), nullable=True),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "sessions",
        sa.Column("user_id", sa.String(64), primary_key=True),
        sa.Column("session_id", sa.String(64), primary_key=True),
        sa.Column("epoch", sa.String(64), nullable=False),
        sa.Column("started_ms", sa.BigInteger(), nullable=False),
        sa.Column("ended_ms", sa.BigInteger(), nullable=True),
    )
    op.create_index("ix_sessions_active", "sessions", ["ended_ms", "user_id"])
    op.create_table(
        "conversations",
        sa.Column("conversation_id", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("title", sa.String(200), nullable=True),
        sa.Column("owner_id", sa.String(64), nullable=True),
        sa.Column("parent_conversation_id", sa.String(64), nullable=True),
        sa.Column("parent_message_id", sa.String(64), nullable=True),
        sa.Column("direct_key", sa.String(129), nullable=True),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_conversations_parent_conversation_id", "conversations", ["parent_conversation_id"])
    op.create_index("ix_conversations_parent_message_id", "conversations", ["parent_message_id"], unique=True)
    op.create_index("ix_conversations_direct_key", "conversations", ["direct_key"], unique=True)
    op.create_table(
        "participants",
        sa.Column("conversation_id", sa.String(64), primary_key=True),
        sa.Column("user_id", sa.String(64), primary_key=True),
    )
    op.create_index("ix_participants_user", "participants", ["user_id", "conversation_id"])
    op.create_table(
        "messages",
        sa.Column("message_id", sa.String(64), primary_key=True),
        sa.Column("conversation_id", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("sender_id", sa.String(64), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("client_msg_id", sa.String(64), nullable=True),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.UniqueConstraint("conversation_id", "seq", name="uq_messages_seq"),
        sa.UniqueConstraint(
            "conversation_id", "sender_id", "client_msg_id", name="uq_messages_client_msg_id"
        ),
    )
    op.create_index("ix_messages_created", "messages", ["conversation_id", "created_ms", "seq"])


def downgrade() -> None:
    for table in ("messages", "participants", "conversations", "sessions", "users"):
        op.drop_table(table)
