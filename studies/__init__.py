"""The studies: multi-seed experiments on the examples, each reproducible from its results.

Every study is one module here that follows the protocol of :mod:`studies.study_harness` (a
:class:`~studies.study_harness.Study` subclass: arms, runs, a resumable results file under
``docs/study/``, a summary and plots computed from that file alone). Run them from the
repository root: ``python -m studies.<module>`` (``--report`` rebuilds the summary without
training); the Makefile has a target per study.
"""
