"""requests.model_source: how the node got the model it served (local, copied from a peer).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 00:00:00

Nullable, so rows written before it read as "not recorded" rather than as a guess.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: Union[str, Sequence[str], None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.add_column(sa.Column("model_source", sa.String(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("model_source")
