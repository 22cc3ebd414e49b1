"""refused candidates: global models the aggregate check or the deployment gate kept back;
versions the gate passed

Revision ID: agg_0002_refusals
Revises: agg_0001_initial
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = 'agg_0002_refusals'
down_revision = 'agg_0001_initial'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('agg_refusals',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('at', sa.Float(), nullable=False),
    sa.Column('base_version', sa.Integer(), nullable=False),
    sa.Column('round', sa.Integer(), nullable=False),
    sa.Column('reason', sa.String(length=32), nullable=False),
    sa.Column('detail', sa.String(length=500), nullable=False),
    sa.Column('senders', sa.JSON(), nullable=False),
    sa.Column('client_weights', sa.JSON(), nullable=False),
    sa.Column('figures', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('agg_state', schema=None) as batch_op:
        batch_op.add_column(sa.Column('gate_passed', sa.Integer(), server_default='0', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('agg_state', schema=None) as batch_op:
        batch_op.drop_column('gate_passed')
    op.drop_table('agg_refusals')
