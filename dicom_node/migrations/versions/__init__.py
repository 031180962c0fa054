"""The revisions: ``node_*`` for the node database, ``audit_*`` for the audit store, each a
branch of its own (``node@head``, ``audit@head``) kept in its own version table."""
