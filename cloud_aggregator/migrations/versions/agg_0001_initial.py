"""initial schema: state, pool, replay keys, clients, checkpoints, rounds, rejections, pending chunks

The schema the aggregator made with create_all before it had migrations: such a
database is stamped with this revision (cloud_aggregator.store.migrate), not rebuilt.

Revision ID: agg_0001_initial
Revises: 
Create Date: 2026-12-03 17:33:57.718462
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = 'agg_0001_initial'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('agg_checkpoints',
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('weights', sa.LargeBinary(), nullable=False),
    sa.Column('state', sa.LargeBinary(), nullable=False),
    sa.Column('state_meta', sa.JSON(), nullable=False),
    sa.Column('envelope', sa.LargeBinary(), nullable=True),
    sa.PrimaryKeyConstraint('version')
    )
    op.create_table('agg_clients',
    sa.Column('sender', sa.String(length=64), nullable=False),
    sa.Column('online', sa.Boolean(), nullable=False),
    sa.Column('status', sa.JSON(), nullable=False),
    sa.Column('status_at', sa.Float(), nullable=True),
    sa.Column('last_update_at', sa.Float(), nullable=True),
    sa.Column('total_submissions', sa.Integer(), nullable=False),
    sa.Column('window_submissions', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('sender')
    )
    op.create_table('agg_pending_chunks',
    sa.Column('sender', sa.String(length=64), nullable=False),
    sa.Column('message_id', sa.String(length=64), nullable=False),
    sa.Column('index', sa.Integer(), nullable=False),
    sa.Column('frame', sa.LargeBinary(), nullable=False),
    sa.Column('first_seen', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('sender', 'message_id', 'index')
    )
    op.create_table('agg_pool',
    sa.Column('sender', sa.String(length=64), nullable=False),
    sa.Column('message_id', sa.String(length=64), nullable=False),
    sa.Column('base_version', sa.Integer(), nullable=False),
    sa.Column('round', sa.Integer(), nullable=False),
    sa.Column('num_samples', sa.Integer(), nullable=False),
    sa.Column('submissions', sa.Integer(), nullable=False),
    sa.Column('metrics', sa.JSON(), nullable=False),
    sa.Column('received_at', sa.Float(), nullable=False),
    sa.Column('wire_bytes', sa.Integer(), nullable=False),
    sa.Column('envelope', sa.LargeBinary(), nullable=False),
    sa.PrimaryKeyConstraint('sender')
    )
    op.create_table('agg_rejections',
    sa.Column('reason', sa.String(length=32), nullable=False),
    sa.Column('count', sa.Integer(), nullable=False),
    sa.Column('last_detail', sa.String(length=500), nullable=False),
    sa.Column('last_sender', sa.String(length=64), nullable=False),
    sa.Column('last_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('reason')
    )
    op.create_table('agg_rounds',
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('strategy', sa.String(length=32), nullable=False),
    sa.Column('round', sa.Integer(), nullable=False),
    sa.Column('num_updates', sa.Integer(), nullable=False),
    sa.Column('live_clients', sa.Integer(), nullable=False),
    sa.Column('senders', sa.JSON(), nullable=False),
    sa.Column('client_weights', sa.JSON(), nullable=False),
    sa.Column('metrics', sa.JSON(), nullable=False),
    sa.Column('info', sa.JSON(), nullable=False),
    sa.Column('bytes_up', sa.Integer(), nullable=False),
    sa.Column('bytes_down', sa.Integer(), nullable=False),
    sa.Column('started_at', sa.Float(), nullable=True),
    sa.Column('finished_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('version')
    )
    op.create_table('agg_seen',
    sa.Column('sender', sa.String(length=64), nullable=False),
    sa.Column('message_id', sa.String(length=64), nullable=False),
    sa.Column('received_at', sa.Float(), nullable=False),
    sa.Column('base_version', sa.Integer(), nullable=False),
    sa.Column('wire_bytes', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('sender', 'message_id')
    )
    with op.batch_alter_table('agg_seen', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_agg_seen_received_at'), ['received_at'], unique=False)

    op.create_table('agg_state',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('round', sa.Integer(), nullable=False),
    sa.Column('selected', sa.JSON(), nullable=False),
    sa.Column('round_opened_at', sa.Float(), nullable=True),
    sa.Column('global_parts', sa.Integer(), nullable=False),
    sa.Column('strategy', sa.String(length=32), nullable=False),
    sa.Column('updated_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )


def downgrade() -> None:
    op.drop_table('agg_state')
    with op.batch_alter_table('agg_seen', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_agg_seen_received_at'))

    op.drop_table('agg_seen')
    op.drop_table('agg_rounds')
    op.drop_table('agg_rejections')
    op.drop_table('agg_pool')
    op.drop_table('agg_pending_chunks')
    op.drop_table('agg_clients')
    op.drop_table('agg_checkpoints')
