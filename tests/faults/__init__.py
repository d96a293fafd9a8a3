"""The fault matrix: the real agent against broken, slow and hostile coordinators.

Rows are data (:mod:`tests.faults.rows`); each group of rows has one runner module
(``test_<group>.py``) and every row ends in the same checks (:mod:`tests.faults.checks`).
``python -m tests.faults.table`` runs the suite and writes ``docs/reliability.md``.
"""
