"""Subject datasets: sources, ingest, captions, dedupe, split, the ``prepare`` stage and loader.

Public API::

    make_sample_subject(out_dir, n_images, seed=0) -> list[Path]
    resolve_source(cfg, root) -> SubjectSource
    scan_source(cfg, root) -> dict                  # fingerprint for an always-run DVC stage
    prepare_subject(cfg, root) -> PrepareResult     # writes <prepared_dir>/<subject>/
    load_prepared(prepared_subject_dir) -> PreparedSubject
    with_subject(cfg, subject) -> HarnessConfig     # data.class_name = the subject's class

See :mod:`harness.data.prepare` for the output layout and :mod:`harness.data.split` for the
few-photos train/reference policy.
"""

from harness.data.errors import DataError, Rejection
from harness.data.loader import PreparedImage, PreparedSubject, load_prepared, with_subject
from harness.data.prepare import PrepareResult, prepare_subject
from harness.data.sample import make_sample_subject
from harness.data.source import SubjectSource, resolve_source, scan_source

__all__ = [
    "DataError",
    "PrepareResult",
    "PreparedImage",
    "PreparedSubject",
    "Rejection",
    "SubjectSource",
    "load_prepared",
    "make_sample_subject",
    "prepare_subject",
    "resolve_source",
    "scan_source",
    "with_subject",
]
