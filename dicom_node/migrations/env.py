"""Alembic's environment: run one database's revisions on the connection the node passes.

The caller (:mod:`dicom_node.migrations`) holds that connection in a transaction under the
database's schema lock; the revisions run inside it.
"""

from alembic import context

context.configure(connection=context.config.attributes["connection"],
                  version_table=context.config.attributes["version_table"])
with context.begin_transaction():
    context.run_migrations()
