"""Optuna studies of a sweep: storage, samplers, pruners, and the refusal of mismatched resumes.

A sweep's identity is ``<sweep.study_name>-<fingerprint>`` (:func:`study_id`), the fingerprint
hashing everything that changes what an evaluated point means (:func:`study_signature`): a
changed training, data, model or evaluation setting opens a fresh study (and never reports
another configuration's results), and switching back resumes the old one. A study ``S`` is
three studies in one storage:

``S.runs``
    one trial per training run; the sampler proposes the training parameters here. Its values
    are those of the run's representative evaluated point (see :mod:`harness.sweep.runner`).
``S.proxy``
    single-objective twin of each run trial, holding the cheap proxy score reported at every
    checkpoint step; the pruner reads it. (Optuna cannot prune multi-objective trials, so
    pruning lives here, for single- and multi-objective sweeps alike.)
``S``
    every evaluated point (training parameters x checkpoint step x inference setting) as its
    own completed trial with all parameters and scores: the Pareto front, importances and
    the results table come from here.

Runs use Optuna's heartbeat: a worker killed hard leaves its run stale, and the next worker
marks it failed and re-queues the same parameters (``RetryHeartbeatStaleTrialCallback``); the trainer
then resumes from the run's last checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import distribution_to_json
from optuna.storages import (
    BaseStorage,
    JournalStorage,
    RDBStorage,
    RetryHeartbeatStaleTrialCallback,
)
from optuna.trial import FrozenTrial
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from harness.config import VALIDATION_KEYS, HarnessConfig, identity_dump
from harness.errors import HarnessError
from harness.sweep.claims import engine_options, journal_path
from harness.sweep.pooling import close_when_idle
from harness.sweep.retry import RetryingRDBStorage, retry_schema_race
from harness.sweep.space import evaluated_distributions, grid_search_space, training_distributions

__all__ = [
    "BUDGET_ATTR",
    "WORKER_ATTR",
    "Studies",
    "SweepError",
    "directions",
    "existing_studies",
    "fail_orphan_proxies",
    "make_pruner",
    "make_sampler",
    "objective_names",
    "open_studies",
    "recover_dead_runs",
    "safe_storage_url",
    "storage_url",
    "study_id",
    "study_signature",
    "train_settings",
]

logger = logging.getLogger(__name__)
SIGNATURE_ATTR = "harness_signature"


class SweepError(HarnessError):
    """A sweep cannot start or continue (e.g. a resume with a different search space)."""


@dataclass
class Studies:
    """The three studies of one sweep."""

    points: optuna.Study
    runs: optuna.Study
    proxy: optuna.Study
    storage_url: str
    name: str = ""


def objective_names(cfg: HarnessConfig) -> list[str]:
    """Metric names of the objectives: ``[subject, prompt]`` or ``["weighted"]``."""
    if cfg.sweep.weights:
        return ["weighted"]
    return [cfg.sweep.subject_metric, cfg.sweep.prompt_metric]


def directions(cfg: HarnessConfig) -> list[optuna.study.StudyDirection]:
    """All objectives are maximised."""
    return [optuna.study.StudyDirection.MAXIMIZE] * len(objective_names(cfg))


STORAGE_ENV = "HARNESS_SWEEP_STORAGE"


def storage_url(cfg: HarnessConfig, root: Path) -> str:
    """``$HARNESS_SWEEP_STORAGE``, else ``sweep.storage``, else a SQLite file in ``sweep.dir``
    (not a DVC output, so never deleted). The variable keeps a password out of params.yaml."""
    url = os.environ.get(STORAGE_ENV) or cfg.sweep.storage
    if url:
        return url
    folder = (root / cfg.sweep.dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'study.db'}"


def _storage(url: str, cfg: HarnessConfig) -> BaseStorage:
    journal = journal_path(url)
    if journal is not None:
        return _journal_storage(journal)
    interval = cfg.sweep.heartbeat_interval_s
    with warnings.catch_warnings():
        # Heartbeats are "experimental" in Optuna since 2.8; the warning says nothing actionable.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _heartbeat_storage(url, interval, cfg)


# A run's worker may die this many times and the run is queued again; one death more and it
# is given up (the kernel's OOM killer sends SIGKILL: the same settings kill the next worker).
MAX_DEAD_RETRIES = 2


class RetryDeadRun(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a run whose worker died (same parameters, queued to run first), which
    gives up after ``max_retry`` retries in silence; here the given-up run is recorded with its
    reason in the study (:func:`given_up_runs`: the summary and ``harness sweep status`` count
    it as failed and say why) and every death is logged."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        deaths = len(trial.system_attrs.get("retry_history", [])) + 1
        if self._max_retry is None or deaths <= self._max_retry:
            # Here for both ways a death is found (Optuna's stale heartbeat, or no live worker
            # holds the run): one line each.
            logger.warning("run %d: its worker is gone; it is queued again", trial.number)
            super().__call__(study, trial)
            return
        reason = (
            f"its worker died {deaths} times running it (killed: out of memory?); not retried "
            "again: look at the workers' logs and the machine's, or lower its memory use"
        )
        # On the study: the trial is finished and Optuna refuses to change it. One key per run,
        # so two workers giving up two runs at once do not overwrite each other.
        study.set_user_attr(GIVEN_UP_PREFIX + str(trial.number), reason)
        logger.warning("run %d: %s", trial.number, reason)


GIVEN_UP_PREFIX = "given_up:"
# The run budget the sweep's workers hold the study to (:func:`harness.sweep.space.run_budget`
# of the last worker to start): what `harness sweep status` shows, whatever its caller's config.
BUDGET_ATTR = "run_budget"
# The worker a run's attempt ran under (its trial's user attribute).
WORKER_ATTR = "worker"


def given_up_runs(study: optuna.Study) -> dict[int, str]:
    """``{run trial number: reason}`` of the runs :class:`RetryDeadRun` gave up."""
    return {
        int(key.removeprefix(GIVEN_UP_PREFIX)): str(reason)
        for key, reason in study.user_attrs.items()
        if key.startswith(GIVEN_UP_PREFIX)
    }


def fail_reason(trial: FrozenTrial, given_up: Mapping[int, str]) -> str | None:
    """Why a failed run failed for good (its own ``fail_reason``, or given up after its worker
    died too often); None for a run that was stopped and queued again."""
    reason = trial.user_attrs.get("fail_reason")
    return str(reason) if reason is not None else given_up.get(trial.number)


def retried_runs(trials: Sequence[FrozenTrial]) -> set[int]:
    """Numbers of the runs that were stopped and queued again (Ctrl-C, a dead worker, the
    user error that stopped the sweep): attempts, each continued by a later trial."""
    out: set[int] = set()
    for t in trials:
        if isinstance(t.user_attrs.get("retry_of"), int):
            out.add(t.user_attrs["retry_of"])
        out.update(n for n in t.system_attrs.get("retry_history", []) if isinstance(n, int))
    return out


def _heartbeat_storage(url: str, interval: int, cfg: HarnessConfig) -> RDBStorage:
    storage = retry_schema_race(
        lambda: RetryingRDBStorage(
            url,
            heartbeat_interval=interval,
            grace_period=cfg.sweep.grace_period_s or 2 * interval,
            heartbeat_stale_trial_callback=RetryDeadRun(max_retry=MAX_DEAD_RETRIES),
            engine_kwargs=engine_options(url),
        )
    )
    storage.retry_s = cfg.sweep.storage_retry_s
    close_when_idle(storage.engine)
    return storage


def _plain_storage(url: str, cfg: HarnessConfig) -> BaseStorage:
    """The storage of the studies written by ask/tell (no heartbeat)."""
    journal = journal_path(url)
    if journal is not None:
        return _journal_storage(journal)
    storage = retry_schema_race(lambda: RetryingRDBStorage(url, engine_kwargs=engine_options(url)))
    storage.retry_s = cfg.sweep.storage_retry_s
    close_when_idle(storage.engine)
    return storage


def _journal_storage(path: Path) -> JournalStorage:
    """Optuna's journal file: many workers on a shared file system, no database server."""
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    path.parent.mkdir(parents=True, exist_ok=True)
    backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
    return JournalStorage(backend)


def make_sampler(
    cfg: HarnessConfig, resumed_runs: int = 0, worker_slot: int = 0
) -> optuna.samplers.BaseSampler:
    """The configured sampler for training parameters, seeded.

    ``resumed_runs`` offsets the seed: a resumed sweep must not replay the first call's random
    draws (a reseeded random sampler would propose the same configurations again). Each worker
    slot gets its own seed (slot 0 keeps ``sweep.seed + resumed_runs``), so parallel workers
    draw different configurations.
    """
    sweep = cfg.sweep
    seed = sweep.seed + resumed_runs
    if worker_slot:
        digest = hashlib.sha256(f"{sweep.seed}/{worker_slot}/{resumed_runs}".encode()).digest()
        seed = int.from_bytes(digest[:4], "big") >> 1
    if sweep.sampler == "grid":
        return optuna.samplers.GridSampler(grid_search_space(sweep), seed=seed)
    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if sweep.sampler == "nsgaii":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=4)
    # group: a conditional space (harness.config.SEARCH_CONDITIONS) is modelled per subspace of
    # the parameters trials actually have; an unconditional space is one group, as before.
    # Both options are chosen knowingly: Optuna's "experimental" warning is noise to a user.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=4, multivariate=True, group=True
        )


def make_pruner(cfg: HarnessConfig) -> optuna.pruners.BasePruner:
    """The pruner applied to proxy scores at checkpoint steps."""
    sweep = cfg.sweep
    if sweep.pruner == "none":
        return optuna.pruners.NopPruner()
    if sweep.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=sweep.pruner_warmup_steps)


# Settings that never change what a point means: where files live, how fast work runs, budgets.
_NOT_MEANING = {
    "model": {"device", "cache_dir"},
    "data": {"raw_dir", "prepared_dir", "dreambench_dir", "max_image_pixels"},
    "train": {"output_dir", *VALIDATION_KEYS},
}
# The eval keys a sweep reads (the inference grid replaces the single-setting ones; the batch
# size never changes an image, every image has its own seeded generator).
_SWEEP_EVAL_KEYS = (
    "prompts",
    "prompt_source",
    "images_per_prompt",
    "seed",
    "resolution",
    "scheduler",
    "prior_preservation_images",
)


def train_settings(cfg: HarnessConfig) -> dict[str, Any]:
    """Every ``train`` setting of ``cfg`` that changes what a point means (JSON values): all
    but those of the exclusion list :func:`study_signature` uses too (the output folder)."""
    return cfg.train.model_dump(mode="json", exclude=_NOT_MEANING["train"])


def study_signature(cfg: HarnessConfig, root: Path | None = None) -> dict[str, Any]:
    """Everything that changes what an evaluated point means, so a resume cannot mix points of
    two setups: objectives, search space, the fixed training settings (not the searched ones),
    the data settings, the model, the seed and the evaluation protocol (adaptive evaluation's
    rungs included); with ``root``, also the prepared photos there (other photos with the same settings are another study)."""
    dists = {**training_distributions(cfg.sweep), **evaluated_distributions(cfg)}
    searched = set(cfg.sweep.space)
    eval_section = cfg.eval.model_dump(mode="json")
    return {
        "objectives": objective_names(cfg),
        "directions": [d.name.lower() for d in directions(cfg)],
        "weights": cfg.sweep.weights,
        "space": {name: json.loads(distribution_to_json(d)) for name, d in sorted(dists.items())},
        "inference": identity_dump("inference", cfg.sweep.inference),
        "eval": {key: eval_section[key] for key in _SWEEP_EVAL_KEYS},
        "metrics": identity_dump("metrics", cfg.metrics, {"batch_size"}),
        "model": identity_dump("model", cfg.model, _NOT_MEANING["model"]),
        "data": identity_dump("data", cfg.data, _NOT_MEANING["data"]),
        "train": identity_dump("train", cfg.train, _NOT_MEANING["train"] | searched),
        "seed": cfg.seed,
        # Which points get the full protocol. Only when adaptive, so exhaustive studies keep
        # the names they had before the key existed.
        **(
            {}
            if cfg.sweep.evaluation == "exhaustive"
            else {"evaluation": cfg.sweep.evaluation.model_dump(mode="json")}
        ),
        **_photos(cfg, root),
    }


def _photos(cfg: HarnessConfig, root: Path | None) -> dict[str, Any]:
    """``{"photos": fingerprint}`` of the prepared subject under ``root``, if prepared; for
    ``data.subjects``, ``{"photos": {subject: fingerprint}}`` of the prepared ones."""
    from harness.data.loader import prepared_fingerprint
    from harness.data.subjects import is_multi_subject, subject_names

    if root is None:
        return {}
    if not is_multi_subject(cfg.data):
        found = prepared_fingerprint(root / cfg.data.prepared_dir / cfg.data.subject)
        return {} if found is None else {"photos": found}
    prints = {
        name: prepared_fingerprint(root / cfg.data.prepared_dir / name)
        for name in subject_names(cfg.data, root)
    }
    kept = {name: found for name, found in prints.items() if found is not None}
    return {"photos": kept} if kept else {}


def study_id(cfg: HarnessConfig, root: Path | None = None) -> str:
    """``<sweep.study_name>-<8 hex>``: the study this configuration's points belong to (with
    ``root``: and the photos prepared there, as the stages open it)."""
    return _study_name(cfg, study_signature(cfg, root))


def _study_name(cfg: HarnessConfig, signature: dict[str, Any]) -> str:
    payload = json.dumps(signature, sort_keys=True).encode()
    return f"{cfg.sweep.study_name}-{hashlib.sha256(payload).hexdigest()[:8]}"


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """One line per differing leaf, e.g. ``train.lr_warmup_steps: 0 -> 5``."""
    from harness.compose import differences

    return [
        f"{_readable(key)}: {json.dumps(was)} -> {json.dumps(now)}"
        for key, now, was in differences(new, old)
    ]


def _readable(key: str) -> str:
    """``space.rank.attributes.high`` (Optuna's JSON form of a distribution, as the signature
    stores it) as ``space.rank.high``."""
    parts = key.split(".")
    if len(parts) > 3 and parts[0] == "space" and parts[2] == "attributes":
        del parts[2]
    return ".".join(parts)


def _log_new_study(storage: BaseStorage, prefix: str, name: str, signature: dict[str, Any]) -> None:
    """Say why a new study starts: what differs from the latest other study of the same
    ``sweep.study_name`` (its results are kept and come back when the config does)."""
    pattern = re.compile(rf"^{re.escape(prefix)}-[0-9a-f]{{8}}\.runs$")
    siblings = [
        s
        for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
        if pattern.match(s.study_name) and s.study_name != f"{name}.runs"
    ]
    if not siblings:
        logger.info("new study %s", name)
        return
    latest = max(siblings, key=lambda s: (s.datetime_start is not None, s.datetime_start or 0))
    old = latest.user_attrs.get(SIGNATURE_ATTR) or {}
    logger.info(
        "new study %s: the configuration differs from study %s (kept; switching back "
        "resumes it) in:\n  %s",
        name,
        latest.study_name.removesuffix(".runs"),
        "\n  ".join(_differences(old, signature)),
    )


def existing_studies(cfg: HarnessConfig, root: Path) -> Studies | None:
    """The sweep's studies when this configuration's study exists, else None; for readers
    (``harness sweep status``), which must create nothing: no study, no SQLite or journal file.
    """
    import sqlalchemy as sa

    url = storage_url(cfg, root)
    journal = journal_path(url)
    local = journal
    if journal is None and url.startswith("sqlite"):
        database = sa.engine.make_url(url).database
        local = Path(database) if database and database != ":memory:" else None
    if local is not None and not local.exists():
        return None
    with _storage_errors(url):
        names = optuna.get_all_study_names(_plain_storage(url, cfg))
    if f"{study_id(cfg, root)}.runs" not in names:
        return None
    return open_studies(cfg, root)


def open_studies(cfg: HarnessConfig, root: Path) -> Studies:
    """Create or load the sweep's studies; refuse a resume whose signature differs.

    Raises:
        SweepError: when an existing study was made with other objectives, search space or
            evaluation protocol (the message lists every difference).
    """
    url = storage_url(cfg, root)
    # Optuna's "Using an existing study" lines, three per open, say nothing a user needs.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with _storage_errors(url):
        storage = _storage(url, cfg)
        # Heartbeats belong to the optimised runs study only; the others are written by ask/tell.
        plain = _plain_storage(url, cfg)
    signature = study_signature(cfg, root)  # once: it reads the prepared manifest
    name = _study_name(cfg, signature)
    runs = optuna.create_study(
        study_name=f"{name}.runs",
        storage=storage,
        directions=directions(cfg),
        load_if_exists=True,
    )
    runs.sampler = make_sampler(cfg, resumed_runs=len(runs.get_trials(deepcopy=False)))
    stored = runs.user_attrs.get(SIGNATURE_ATTR)
    if stored is None:
        _log_new_study(storage, cfg.sweep.study_name, name, signature)
        runs.set_user_attr(SIGNATURE_ATTR, signature)
    elif stored != signature:
        raise SweepError(
            f"sweep.study_name: study {name!r} in {safe_storage_url(url)} was created with a different "
            "configuration; use a new sweep.study_name (or restore the old config) to continue:\n  "
            + "\n  ".join(_differences(stored, signature))
        )
    points = optuna.create_study(
        study_name=name, storage=plain, directions=directions(cfg), load_if_exists=True
    )
    proxy = optuna.create_study(
        study_name=f"{name}.proxy",
        storage=plain,
        direction="maximize",
        pruner=make_pruner(cfg),
        load_if_exists=True,
    )
    _name_metrics(cfg, points, runs, proxy)
    return Studies(points=points, runs=runs, proxy=proxy, storage_url=url, name=name)


def _name_metrics(
    cfg: HarnessConfig, points: optuna.Study, runs: optuna.Study, proxy: optuna.Study
) -> None:
    """Objective names for ``optuna-dashboard`` and ``study.metric_names`` (set once)."""
    names = objective_names(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for study, metric in ((points, names), (runs, names), (proxy, ["proxy score"])):
            if study.metric_names != metric:
                study.set_metric_names(metric)


# Only PostgreSQL's driver is a dependency: a MySQL user installs one.
MYSQL_DRIVER_HINT = "pip install -e '.[mysql]' and write the URL as mysql+pymysql://..."


@contextlib.contextmanager
def _storage_errors(url: str) -> Iterator[None]:
    """A storage that cannot be opened (bad URL, server down, wrong password, no database, a
    schema of another Optuna version) is a user error naming ``sweep.storage`` with the password
    masked, not a driver traceback."""
    try:
        yield
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        reason = detail[0] if detail else type(exc).__name__
        password = _url_password(url)
        if password:
            reason = reason.replace(password, "***")
        if isinstance(exc, ImportError) and url.startswith("mysql"):
            reason = f"no MySQL driver ({reason}): {MYSQL_DRIVER_HINT}"
        raise SweepError(
            f"sweep.storage: cannot open {safe_storage_url(url)}: {safe_storage_url(reason)}"
        ) from None
    except RuntimeError as exc:
        # Optuna refuses a schema another Optuna version wrote, and says how to fix it.
        if "table schema" not in str(exc):
            raise
        advice = str(exc).replace("$STORAGE_URL", safe_storage_url(url))
        raise SweepError(f"sweep.storage: {safe_storage_url(url)}: {advice}") from None


def _url_password(url: str) -> str | None:
    try:
        password = make_url(url).password
        return None if password is None else str(password)
    except Exception:  # an unparsable URL has no password to hide beyond what redact_text does
        return None


def recover_dead_runs(studies: Studies, dead: Sequence[FrozenTrial] = ()) -> None:
    """Fail the runs whose worker died now, which queues their retry (same parameters).

    Dead are the runs with a stale Optuna heartbeat (databases) and ``dead`` (runs no live
    worker holds, see harness.sweep.worker: every storage). Optuna checks heartbeats only when
    a worker starts a new run; a sweep whose budget is used up starts none, and its dead runs
    would stay RUNNING forever. Their proxy twins are failed too.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(studies.runs)
        retry = RetryDeadRun(max_retry=MAX_DEAD_RETRIES)
        for trial in dead:
            try:
                studies.runs.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            except (ValueError, RuntimeError):  # finished or failed meanwhile by someone else
                continue
            retry(studies.runs, studies.runs.get_trials(deepcopy=False)[trial.number])
    fail_orphan_proxies(studies)


def fail_orphan_proxies(studies: Studies) -> None:
    """Fail every RUNNING proxy trial whose run is no longer RUNNING (killed worker, tracking
    failure, crash): a proxy trial never outlives its run."""
    runs = studies.runs.get_trials(deepcopy=False)
    live_runs = {t.number for t in runs if t.state == optuna.trial.TrialState.RUNNING}
    owner = {t.user_attrs["proxy_trial"]: t.number for t in runs if "proxy_trial" in t.user_attrs}
    for proxy in studies.proxy.get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)
    ):
        run = proxy.user_attrs.get("run_trial", owner.get(proxy.number))
        # No owner known yet: the run is between asking for its twin and recording it.
        if run is None or run in live_runs or owner.get(proxy.number) in live_runs:
            continue
        try:
            studies.proxy.tell(proxy.number, state=optuna.trial.TrialState.FAIL)
        except (ValueError, RuntimeError):  # finished meanwhile by its own worker
            logger.debug("proxy trial %d finished concurrently", proxy.number)


def safe_storage_url(url: str) -> str:
    """The storage URL with any password masked (it goes into messages and logs)."""
    from harness.tracking import redact_text

    return redact_text(url)
