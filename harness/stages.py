"""The DVC stages and CLI commands as plain functions (``dvc.yaml`` runs ``harness <stage>``,
whose thin command calls one function here).

``resolve``
    always runs (cheap): validates the config, writes the resolved sections of the training
    side (:data:`SECTIONS`) to ``runs/resolved/<section>.json`` (secrets masked, for people)
    and a fingerprint of the subject's raw photos to ``runs/resolved/source.json``, on which
    ``prepare`` depends (the stages declare their settings as DVC params of ``params.yaml``;
    what ``data.token: auto`` reads outside ``data`` is in ``source.json`` too, see
    :func:`identifier_inputs`).
``prepare``
    the dataset stage (:mod:`harness.data`).
``sweep``
    the Optuna sweep (:mod:`harness.sweep`) with the real backend.
``evaluate``
    the sweep's chosen points and the base model re-scored on fresh seeds
    (:mod:`harness.sweep.confirm`): confirmation scores next to the selection-biased sweep
    scores, and ``reports/metrics.json``.
``report``
    the comparison report (:mod:`harness.report`): ``reports/index.html`` and
    ``reports/summary.md`` from the sweep's and the evaluate stage's outputs, attached to the
    tracker.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from harness.config import HarnessConfig

__all__ = [
    "RESOLVED_DIR",
    "identifier_inputs",
    "prepared_subject_dir",
    "run_evaluate_stage",
    "run_export",
    "run_generate",
    "run_prepare",
    "run_report_stage",
    "run_resolve",
    "run_status",
    "run_sweep_stage",
    "run_train",
]

logger = logging.getLogger(__name__)
RESOLVED_DIR = "runs/resolved"
SECTIONS = ("model", "data", "train", "eval", "metrics", "sweep", "tracking")


def _write_json(path: Path, data: Any) -> None:
    """Deterministic JSON, rewritten only when the content changes."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def run_resolve(cfg: HarnessConfig, root: Path, out_dir: Path | None = None) -> Path:
    """Write the resolved config sections (secrets masked) and the raw-photo fingerprint."""
    from harness.data.subjects import scan_subjects
    from harness.tracking import scrub_secrets

    out = out_dir or root / RESOLVED_DIR
    data = scrub_secrets(cfg.to_dict())
    for section in SECTIONS:
        _write_json(out / f"{section}.json", {"seed": data["seed"], section: data[section]})
    source = scan_subjects(cfg.data, root)
    inputs = identifier_inputs(cfg)
    if inputs is not None:  # absent for a fixed token: source.json (and dvc.lock) as before
        source["identifier"] = inputs
    _write_json(out / "source.json", source)
    return out


def identifier_inputs(cfg: HarnessConfig) -> dict[str, Any] | None:
    """What ``data.token: auto`` reads besides the ``data`` settings: the model whose tokenizer
    it chooses from and every prompt whose words it avoids (None for a fixed token).

    ``resolve`` writes them into ``source.json``, on which ``prepare`` depends: a DVC params
    entry cannot depend on ``data.token``, and declaring ``model`` and ``eval`` as params of
    ``prepare`` would rerun it for every setting, auto or not.
    """
    from harness.data.identifier import AUTO

    if cfg.data.token != AUTO:
        return None
    model = {
        key: getattr(cfg.model, key) for key in ("pretrained", "revision", "single_file_config")
    }
    return {"model": model, "avoid": list(_avoided_prompts(cfg))}


def _avoided_prompts(cfg: HarnessConfig) -> tuple[str, ...]:
    """The prompts whose words ``data.token: auto`` never chooses."""
    return (*cfg.eval.prompts, *(cfg.evaluate.prompts or []), cfg.train.class_prompt)


def prepared_subject_dir(cfg: HarnessConfig, root: Path) -> Path:
    """``<prepared_dir>/<subject>`` of the config."""
    return root / cfg.data.prepared_dir / cfg.data.subject


def run_prepare(cfg: HarnessConfig, root: Path, progress: bool = True) -> list[Any]:
    """Prepare the configured subject, or every subject of ``data.subjects`` (see
    :func:`harness.data.prepare_subject`); one result per subject. ``data.token: auto`` is
    resolved here, once, with the model's tokenizer when it is on disk."""
    from harness.data.subjects import prepare_subjects

    return prepare_subjects(cfg.data, root, progress=progress, identifier=_identifier(cfg, root))


def _identifier(cfg: HarnessConfig, root: Path) -> Any:
    """What ``data.token: auto`` chooses with: the model's own tokenizer (else the offline
    CLIP BPE, the same ids) and the words of every prompt a run will use; None for a fixed
    token."""
    from harness.data.identifier import AUTO, IdentifierContext

    if cfg.data.token != AUTO:
        return None
    from harness.models import load_tokenizer

    found = load_tokenizer(cfg.model, root=root)
    avoid = _avoided_prompts(cfg)
    if found is None:
        return IdentifierContext(avoid=avoid)
    return IdentifierContext(tokenizer=found[0], source=found[1], avoid=avoid)


def _load_subject(cfg: HarnessConfig, root: Path) -> tuple[HarnessConfig, Any]:
    """``(config, prepared subject)``; use the returned config from here on.

    It carries the prepared subject's class noun (:func:`harness.data.with_subject`): for
    DreamBench that is the dataset's class, which prior preservation's class prompt needs.
    Cheap (reads the manifest), so it runs before anything slow and fails fast.
    """
    from harness.data import load_prepared, with_subject
    from harness.data.subjects import is_multi_subject

    if is_multi_subject(cfg.data):
        return cfg, _load_subjects(cfg, root)
    subject = load_prepared(prepared_subject_dir(cfg, root))
    return with_subject(cfg, subject), subject


def _load_subjects(cfg: HarnessConfig, root: Path) -> dict[str, Any]:
    """``{subject: prepared subject}`` of ``data.subjects``, each checked (cheap: manifests).

    Raises:
        DataError: one line per subject that is not prepared (its prepare failed, e.g. every
            photo was rejected, or it never ran), before anything slow starts.
    """
    from harness.data import DataError, load_prepared
    from harness.data.subjects import subject_names

    found, missing = {}, []
    for name in subject_names(cfg.data, root):
        try:
            found[name] = load_prepared(root / cfg.data.prepared_dir / name)
        except DataError as exc:
            missing.append(f"subject {name!r}: {exc}")
    if missing:
        raise DataError("\n".join(missing))
    return found


def _backend(cfg: HarnessConfig, loaded: Any, scorer: Any, progress: bool, subject: Any) -> Any:
    """The sweep's backend: :class:`~harness.sweep.backend.HarnessBackend` on the prepared
    ``subject``, or for ``data.subjects`` (``subject`` is then :func:`_load_subject`'s
    ``{name: prepared subject}``) a :class:`~harness.sweep.subjects.SubjectsBackend` with one
    per subject (sharing the pipeline and the scorer)."""
    from harness.data import with_subject
    from harness.data.subjects import is_multi_subject
    from harness.sweep.backend import HarnessBackend
    from harness.sweep.subjects import SubjectsBackend, subject_config

    if not is_multi_subject(cfg.data):
        return HarnessBackend(cfg, loaded, subject, scorer, progress=progress)
    backends, classes = {}, {}
    for name, prepared in subject.items():
        one = with_subject(subject_config(cfg, name), prepared)
        backends[name] = HarnessBackend(one, loaded, prepared, scorer, progress=progress)
        classes[name] = prepared.class_name
    return SubjectsBackend(backends, classes)


def _ready_tracker(cfg: HarnessConfig, root: Path) -> Any:
    """The tracker, checked once up front: strict tracking with a dead server fails here."""
    from harness.tracking import create_tracker

    tracker = create_tracker(cfg.tracking, root)
    tracker.preflight()
    return tracker


def run_train(cfg: HarnessConfig, root: Path, run_dir: Path | None = None) -> Any:
    """One training run with the configured settings (``harness train``)."""
    from harness.models import load_pipeline
    from harness.tracking import NullTracker, default_tags
    from harness.train import train_lora
    from harness.train.distributed import bind_launched_device, is_main_launched_process

    _one_subject(cfg, "train")
    cfg, subject = _load_subject(cfg, root)
    # Under `accelerate launch` every process trains, but only the first one is tracked.
    tracker = _ready_tracker(cfg, root) if is_main_launched_process() else NullTracker()
    bind_launched_device()
    loaded = load_pipeline(cfg.model, root=root)
    run_dir = run_dir or root / cfg.train.output_dir
    pairs = list(zip(subject.train_paths, subject.train_captions, strict=True))
    config = cfg.to_dict()
    with tracker.start_run(
        f"train/{cfg.data.subject}", config=config, tags=default_tags(config)
    ) as run:

        def on_log(record: dict[str, Any], step: int) -> None:
            run.log_scalars(record, step, title="train")

        def on_validation(made: Any) -> None:
            made.log_to(run)

        result = train_lora(cfg, loaded, pairs, run_dir, on_log=on_log, on_validation=on_validation)
        for ckpt in result.checkpoints:
            run.upload_artifact(f"lora-step-{ckpt.step}", ckpt.weights_path)
    return result


def run_generate(
    cfg: HarnessConfig, root: Path, out_dir: Path, adapter: Path | None = None
) -> list[Any]:
    """``harness generate``: the eval prompts x seeds with the eval settings into ``out_dir``.

    The prompts are ``eval.prompts``, or the prepared subject's own (``eval.prompt_source:
    dataset``); once the subject is prepared its class noun fills ``{class_name}`` (for
    DreamBench, the dataset's class). The adapter is checked before the model loads.
    """
    from harness.data.prepare import MANIFEST
    from harness.generate import Speed, eval_seeds, generate_images, resolve_adapter
    from harness.models import load_pipeline
    from harness.sweep.backend import evaluation_templates

    _one_subject(cfg, "generate")
    if adapter is not None:
        resolve_adapter(adapter)  # missing or unsafe weights: one line, before any model loads
    templates = list(cfg.eval.prompts)
    if (
        cfg.eval.prompt_source == "dataset"
        or cfg.data.token == "auto"  # the token is the prepared subject's
        or (prepared_subject_dir(cfg, root) / MANIFEST).is_file()
    ):
        cfg, subject = _load_subject(cfg, root)  # a clear error when it was never prepared
        templates = evaluation_templates(cfg, subject)
    return generate_images(
        load_pipeline(cfg.model, root=root),
        templates=templates,
        token=cfg.data.token,
        class_name=cfg.data.class_name or "object",
        seeds=eval_seeds(cfg),
        settings=[cfg.eval.setting],
        out_dir=out_dir,
        adapter=adapter,
        resolution=cfg.eval.resolution or cfg.data.resolution,
        batch_size=cfg.eval.batch_size,
        speed=Speed.of(cfg),
    )


def run_sweep_stage(
    cfg: HarnessConfig, root: Path, progress: bool = True, summary_task: bool = True
) -> Any:
    """The sweep with the real backend: one loaded pipeline and scorer per worker
    (``summary_task=False``: a plain ``harness sweep worker``, no tracker summary task).

    Everything that can be wrong with the user's setup fails before the first training run,
    cheapest check first: the prepared subject, the study (storage reachable, no mismatched
    resume), the tracker, the metric encoders' weights, then the diffusion model. A study
    with nothing left to run (:func:`~harness.sweep.runner.has_work`) loads neither.
    """
    from harness.models import resolve_device
    from harness.models.identity import model_identity
    from harness.sweep import open_studies, run_sweep
    from harness.sweep._base import LazyBackend
    from harness.sweep.progress import SweepProgress
    from harness.sweep.runner import finished_runs, has_work

    cfg, subject = _load_subject(cfg, root)
    device = resolve_device(cfg.model.device)
    _check_searched_optimizers(cfg, device)
    studies = open_studies(cfg, root)
    tracker = _ready_tracker(cfg, root)

    def build(late: bool = False) -> Any:
        from harness.evaluate import make_scorer
        from harness.models import load_pipeline
        from harness.sweep.claims import open_claims
        from harness.sweep.environment import join_model

        scorer = make_scorer(cfg, device=str(device))
        scorer.load_encoders()
        loaded = load_pipeline(cfg.model, root=root)
        if late:  # for a run that turned up after all: other weights stop it (and the sweep)
            claims = open_claims(studies.storage_url, studies.name, cfg.sweep.storage_retry_s)
            join_model(studies.runs, model_identity(cfg.model, root), claims)
        return _backend(cfg, loaded, scorer, progress, subject)

    # A study with work loads the models now, so a missing weight fails before the first run
    # and other weights before the worker joins; a finished one is summarised without them
    # (built after all if a run turns up).
    model: dict[str, str] | None = None  # the weights' identity, once loaded (checked)
    if has_work(cfg, studies):
        backend = build()
        model = model_identity(cfg.model, root)
    else:
        backend = LazyBackend(lambda: build(late=True))
    sinks = [SweepProgress(cfg, done=finished_runs(studies.runs))] if progress else []
    return run_sweep(
        cfg,
        root,
        backend,
        tracker,
        studies=studies,
        sinks=sinks,
        summary_task=summary_task,
        model=model,
    )


def _check_searched_optimizers(cfg: HarnessConfig, device: Any) -> None:
    """Every optimizer the sweep may draw must run on ``device`` (adamw8bit needs CUDA and
    bitsandbytes): refused before the first run, naming the key; otherwise each run that draws
    it trains nothing (the trainer checks ``train.optimizer`` itself)."""
    from harness.sweep.space import searched_values
    from harness.train.optim import check_optimizer
    from harness.train.records import TrainingError

    for name in searched_values(cfg.sweep, "optimizer") or []:
        try:
            check_optimizer(cfg.train.model_copy(update={"optimizer": name}), device)
        except TrainingError as exc:
            raise TrainingError(f"sweep.space.optimizer: {exc}") from None


def run_status(cfg: HarnessConfig, root: Path) -> Any:
    """``harness sweep status``: the study as the sweep opens it (with the prepared subject's
    class noun and photos, once prepared), see :func:`harness.sweep.status.sweep_status`."""
    from harness.data.prepare import MANIFEST
    from harness.sweep.status import sweep_status

    if (prepared_subject_dir(cfg, root) / MANIFEST).is_file():
        cfg, _ = _load_subject(cfg, root)
    return sweep_status(cfg, root)


def run_evaluate_stage(cfg: HarnessConfig, root: Path, progress: bool = True) -> Any:
    """The evaluate stage: re-score the sweep's chosen points and the base model on fresh seeds.

    Fails fast, cheapest check first and before any model loads: the prepared subject, the
    sweep's results table (missing, no points), the selected points' adapters (deleted, unsafe
    weights), the confirmation seeds, the prompts; then the metric encoders and the model.
    Returns the :class:`harness.sweep.confirm.Confirmation` (table and paths).
    """
    from harness.evaluate import make_scorer
    from harness.generate import resolve_adapter
    from harness.models import load_pipeline, resolve_device
    from harness.sweep.backend import evaluation_templates
    from harness.sweep.confirm import (
        confirm_points,
        confirmation_config,
        read_sweep_results,
        selected_points,
        write_confirmation,
    )

    cfg, subject = _load_subject(cfg, root)
    selected = selected_points(cfg, root, read_sweep_results(cfg, root))
    subjects = subject if isinstance(subject, dict) else {None: subject}
    for adapter in selected["adapter"]:
        for one in _point_adapters(root / adapter, subjects):
            resolve_adapter(one)
    fresh = confirmation_config(cfg)
    for prepared in subjects.values():
        evaluation_templates(fresh, prepared)
    scorer = make_scorer(cfg, device=str(resolve_device(cfg.model.device)))
    scorer.load_encoders()
    backend = _backend(fresh, load_pipeline(cfg.model, root=root), scorer, progress, subject)
    confirmation = confirm_points(cfg, root, selected, backend, progress=progress)
    return write_confirmation(cfg, root, confirmation)


def _point_adapters(adapter: Path, subjects: dict[Any, Any]) -> list[Path]:
    """The adapter folders behind a results row's ``adapter``: itself, or for a multi-subject
    sweep each subject's (a subject of the config the checkpoint lacks is an error)."""
    from harness.errors import HarnessError
    from harness.sweep.subjects import subject_adapters

    if None in subjects:
        return [adapter]
    adapters = subject_adapters(adapter)
    lacking = sorted(set(subjects) - set(adapters))
    if lacking:
        raise HarnessError(f"{adapter}: no adapter for subject(s) {', '.join(lacking)}")
    return [adapters[name] for name in subjects]


def run_export(
    cfg: HarnessConfig, root: Path, point: int | None = None, out: Path | None = None
) -> Any:
    """``harness export``: the best point (the evaluate stage's, else the sweep's) or
    ``point`` as a LoRA folder with its inference setting and a model card
    (:mod:`harness.export`); for a sweep across subjects, one such folder per subject.
    Returns the :class:`~harness.export.Export`. Loads no model."""
    from harness.export import EXPORT_DIR, choose_point, export_point, export_subjects

    cfg, subject = _load_subject(cfg, root)  # the token and class noun the card's prompt uses
    several = isinstance(subject, dict)  # data.subjects: {name: prepared subject}
    row = choose_point(cfg, root, point, multi_subject=several)
    out = out or root / EXPORT_DIR / f"point-{int(row['point'])}"
    if several:
        names = {name: _token_and_class(cfg, one) for name, one in subject.items()}
        return export_subjects(cfg, root, row, out, names)
    token, class_name = _token_and_class(cfg, subject)
    return export_point(cfg, root, row, out, token=token, class_name=class_name)


def _token_and_class(cfg: HarnessConfig, subject: Any) -> tuple[str, str]:
    """The identifier and class noun prompts use for prepared ``subject``."""
    from harness.data import with_subject

    data = with_subject(cfg, subject).data
    return data.token, data.class_name or "object"


def _one_subject(cfg: HarnessConfig, command: str) -> None:
    """``harness train``/``generate`` work on one subject: refuse ``data.subjects``."""
    from harness.data.subjects import is_multi_subject
    from harness.errors import HarnessError

    if is_multi_subject(cfg.data):
        raise HarnessError(
            f"data.subjects: harness {command} works on one subject; add "
            "-S data.subjects=null -S data.subject=<name>"
        )


def run_report_stage(cfg: HarnessConfig, root: Path) -> Path:
    """The report stage: ``<report.dir>/index.html`` and ``summary.md``, then a tracker run
    ``<sweep.study_name>/report`` with both attached; returns the HTML file's path.

    Reads the sweep's and the evaluate stage's tables (a missing evaluate output is one
    :class:`~harness.report.ReportError` line, before the tracker starts), the run folders for
    their cost and, read-only when it exists, the sweep's points study for the importances.
    Loads no model.
    """
    from harness.report import build_report, track_report, write_report

    report = build_report(cfg, root)
    tracker = _ready_tracker(cfg, root)
    files = write_report(cfg, root, report)
    track_report(cfg, tracker, files)
    return files.html
