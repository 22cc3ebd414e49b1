"""initial schema: flows, detections, feedback, model versions, ingest offsets, outbox

Revision ID: 0001_initial
Revises: 
Create Date: 2026-11-24 14:58:26.175289
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0001_initial'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('feedback',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('uid', sa.Text(), nullable=False),
    sa.Column('label', sa.Text(), nullable=False),
    sa.Column('note', sa.Text(), nullable=True),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_feedback'))
    )
    with op.batch_alter_table('feedback', schema=None) as batch_op:
        batch_op.create_index('ix_feedback_source_uid', ['source', 'uid'], unique=False)

    op.create_table('flows',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('uid', sa.Text(), nullable=False),
    sa.Column('ts', sa.Float(), nullable=False),
    sa.Column('orig_h', sa.Text(), nullable=False),
    sa.Column('orig_p', sa.Integer(), nullable=False),
    sa.Column('resp_h', sa.Text(), nullable=False),
    sa.Column('resp_p', sa.Integer(), nullable=False),
    sa.Column('proto', sa.Text(), nullable=False),
    sa.Column('service', sa.Text(), nullable=True),
    sa.Column('duration', sa.Float(), nullable=True),
    sa.Column('orig_bytes', sa.BigInteger(), nullable=True),
    sa.Column('resp_bytes', sa.BigInteger(), nullable=True),
    sa.Column('conn_state', sa.Text(), nullable=True),
    sa.Column('local_orig', sa.Boolean(), nullable=True),
    sa.Column('local_resp', sa.Boolean(), nullable=True),
    sa.Column('missed_bytes', sa.BigInteger(), nullable=True),
    sa.Column('history', sa.Text(), nullable=True),
    sa.Column('orig_pkts', sa.BigInteger(), nullable=True),
    sa.Column('orig_ip_bytes', sa.BigInteger(), nullable=True),
    sa.Column('resp_pkts', sa.BigInteger(), nullable=True),
    sa.Column('resp_ip_bytes', sa.BigInteger(), nullable=True),
    sa.Column('tunnel_parents', sa.Text(), nullable=True),
    sa.Column('ip_proto', sa.Integer(), nullable=True),
    sa.Column('label', sa.Text(), nullable=True),
    sa.Column('detailed_label', sa.Text(), nullable=True),
    sa.Column('extra', sa.Text(), nullable=True),
    sa.Column('ingested_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_flows')),
    sa.UniqueConstraint('uid', 'source', name=op.f('uq_flows_uid_source'))
    )
    with op.batch_alter_table('flows', schema=None) as batch_op:
        batch_op.create_index('ix_flows_orig_h', ['orig_h'], unique=False)
        batch_op.create_index('ix_flows_resp_h', ['resp_h'], unique=False)
        batch_op.create_index('ix_flows_ts', ['ts'], unique=False)

    op.create_table('ingest_offsets',
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('file_identity', sa.Text(), nullable=False),
    sa.Column('offset', sa.BigInteger(), nullable=False),
    sa.Column('header', sa.Text(), nullable=True),
    sa.Column('updated_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('source', name=op.f('pk_ingest_offsets'))
    )
    op.create_table('model_versions',
    sa.Column('version', sa.String(length=128), nullable=False),
    sa.Column('parent', sa.String(length=128), nullable=True),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('metrics', sa.JSON(), nullable=True),
    sa.Column('path', sa.Text(), nullable=True),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.PrimaryKeyConstraint('version', name=op.f('pk_model_versions'))
    )
    op.create_table('outbox',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('topic', sa.String(length=512), nullable=False),
    sa.Column('payload', sa.LargeBinary(), nullable=False),
    sa.Column('qos', sa.Integer(), nullable=False),
    sa.Column('retain', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('acked_at', sa.Float(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_outbox'))
    )
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.create_index('ix_outbox_acked_at', ['acked_at'], unique=False)

    op.create_table('detections',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('uid', sa.Text(), nullable=False),
    sa.Column('label', sa.Text(), nullable=False),
    sa.Column('score', sa.Float(), nullable=False),
    sa.Column('model_version', sa.Text(), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['source', 'uid'], ['flows.source', 'flows.uid'], name=op.f('fk_detections_source_uid_flows'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_detections')),
    sa.UniqueConstraint('source', 'uid', 'model_version', name=op.f('uq_detections_source_uid_model_version'))
    )
    with op.batch_alter_table('detections', schema=None) as batch_op:
        batch_op.create_index('ix_detections_created_at', ['created_at'], unique=False)
        batch_op.create_index('ix_detections_score', ['score'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('detections', schema=None) as batch_op:
        batch_op.drop_index('ix_detections_score')
        batch_op.drop_index('ix_detections_created_at')

    op.drop_table('detections')
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_index('ix_outbox_acked_at')

    op.drop_table('outbox')
    op.drop_table('model_versions')
    op.drop_table('ingest_offsets')
    with op.batch_alter_table('flows', schema=None) as batch_op:
        batch_op.drop_index('ix_flows_ts')
        batch_op.drop_index('ix_flows_resp_h')
        batch_op.drop_index('ix_flows_orig_h')

    op.drop_table('flows')
    with op.batch_alter_table('feedback', schema=None) as batch_op:
        batch_op.drop_index('ix_feedback_source_uid')

    op.drop_table('feedback')
