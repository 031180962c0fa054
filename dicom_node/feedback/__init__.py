"""Radiologists' feedback on the node's findings: agree or disagree, with an optional reason.

``store`` keeps the verdicts (table ``feedback`` of the node database), audits them, lists the
jobs to review and exports the verdicts as CSV; ``users`` keeps the page's users file (scrypt
hashes); ``app`` is the web page (Starlette) that ``serve`` runs when ``feedback.enabled`` is
true. ``dicom-node feedback`` (:mod:`dicom_node.cli.feedback`) records verdicts from the shell.
"""
