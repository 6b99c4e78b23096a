"""The ``harness`` command line: thin commands that load the config and call one core function.

Every command reads ``params.yaml`` (``--params``) and accepts ``-S key.path=value`` overrides.
A user error (bad config, missing path, unloadable model) prints one clear line and exits with
status 2; ``--verbose`` shows the traceback too.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import yaml
from rich.console import Console
from rich.text import Text

from harness.config import HarnessConfig, combine_overrides, load_config
from harness.errors import HarnessError, error_text
from harness.tracking import install_log_redaction

app = typer.Typer(
    name="harness",
    help="DreamBooth LoRA sweep harness: resolve, prepare, train, generate, sweep, evaluate, "
    "report, bench.",
    no_args_is_help=True,
    add_completion=False,
    # Docstrings wrap at 100 columns: markdown joins a paragraph's lines (rich keeps them).
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(
    help="Inspect and validate the resolved configuration.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
app.add_typer(config_app, name="config")

err_console = Console(stderr=True)


def _flags_take_no_value() -> None:
    """Typer 0.29's rich help gives every flag a type column, ``--dry-run <bool>``, as if it
    took a value (``--dry-run true`` is a usage error): a flag is shown with none."""
    option: Any = typer.core.TyperOption
    shown = option.display_type_rich
    if getattr(shown, "flags_without_type", False):
        return

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        return None if self.is_flag else shown(self, ctx)

    display_type_rich.flags_without_type = True  # type: ignore[attr-defined]
    option.display_type_rich = display_type_rich


_flags_take_no_value()


def echo(message: str = "", *, err: bool = False, nl: bool = True) -> None:
    """``typer.echo`` to ``sys.stdout`` (or ``sys.stderr``) named explicitly.

    When click's first write comes after an offline ClearML task (which patches the console
    while it runs), click's own default stream loses the lines on a redirected stdout (``dvc
    repro``, ``> log``): ``harness sweep`` on a finished study printed no summary. The current
    ``sys.stdout`` always gets them.
    """
    typer.echo(message, file=sys.stderr if err else sys.stdout, nl=nl)


T = TypeVar("T")


@dataclass
class _State:
    params: Path = Path("params.yaml")
    overrides: list[str] = field(default_factory=list)
    verbose: bool = False


_state = _State()


def load() -> HarnessConfig:
    """Load the config named by the global options (``--params``, ``-S``)."""
    merged = combine_overrides(_state.overrides)
    return load_config(_state.params, overrides=merged or None)


def project_root() -> Path:
    """The project root: the folder of the params file (relative paths in the config start there)."""
    return _state.params.resolve().parent


def run_command(fn: Callable[[], T]) -> T:
    """Run a command body; user errors become one red line and exit status 2."""
    from metrics.errors import MetricsError  # the scorer's own user errors (missing weights)

    try:
        return fn()
    except (HarnessError, MetricsError, OSError) as exc:
        if _state.verbose:
            err_console.print_exception()
        for line in _error_lines(exc):
            # Text, not markup: a path or a value may hold "[/x]" or ":-1:".
            message = Text.assemble(("error:", "bold red"), " ", line)
            err_console.print(message, highlight=False, soft_wrap=True, emoji=False)
        raise typer.Exit(code=2) from None
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]; finished work was kept")
        raise typer.Exit(code=130) from None


def _error_lines(exc: BaseException) -> list[str]:
    """The lines a user error prints (-v shows where it happened)."""
    return error_text(exc).splitlines() or [type(exc).__name__]


@app.callback()
def _main(
    params: Annotated[
        Path, typer.Option("--params", "-p", help="Params file naming a preset and overrides.")
    ] = Path("params.yaml"),
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-S",
            metavar="<key=value>",
            help="Override a config key, e.g. -S train.rank=8 (repeatable).",
        ),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Debug logging and full tracebacks.")
    ] = False,
) -> None:
    """DreamBooth LoRA sweep harness."""
    _state.params, _state.overrides, _state.verbose = params, list(set_ or []), verbose
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    install_log_redaction()  # no password or token reaches a log line
    for noisy in ("urllib3", "filelock", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not verbose:
        # diffusers warns on every text-encoder-free LoRA load; that is expected here. Its logger
        # is configured from DIFFUSERS_VERBOSITY when diffusers is first imported (later, lazily).
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        logging.getLogger("diffusers").setLevel(logging.ERROR)


@config_app.command("show")
def config_show(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of YAML.")] = False,
) -> None:
    """Print the fully resolved configuration (preset + params.yaml + -S overrides).

    Passwords (of a sweep.storage URL, say) are masked: the output gets pasted into issues."""
    from harness.tracking.secrets import scrub_secrets

    cfg = run_command(load)
    data = scrub_secrets(cfg.to_dict())
    if as_json:
        echo(json.dumps(data, indent=2))
    else:
        echo(yaml.safe_dump(data, sort_keys=False))


@config_app.command("validate")
def config_validate() -> None:
    """Validate the configuration and exit 0, or print every problem and exit 2."""
    cfg = run_command(load)
    echo(f"ok: preset {cfg.preset}, model {cfg.model.pretrained}")


@config_app.command("compose")
def config_compose(
    preset: Annotated[
        str | None, typer.Option("--preset", help="Preset to select (default: config.yaml's).")
    ] = None,
) -> None:
    """Write params.yaml from experiments/ exactly as `dvc exp run` composes it.

    Run this after editing experiments/ when you use plain `dvc repro`.
    """

    def body() -> tuple[Path, bool]:
        from harness.compose import compose_params

        return compose_params(project_root(), preset)

    path, changed = run_command(body)
    echo(f"{'wrote' if changed else 'unchanged:'} {path}")


@config_app.command("defaults")
def config_defaults(
    write: Annotated[
        bool, typer.Option("--write", help="Write experiments/defaults.yaml instead of printing.")
    ] = False,
) -> None:
    """Print (or write) every setting with its code default: experiments/defaults.yaml."""
    from harness.compose import DEFAULTS_FILE, defaults_text

    text = defaults_text()
    if not write:
        echo(text, nl=False)
        return
    path = project_root() / DEFAULTS_FILE
    path.write_text(text, encoding="utf-8")
    echo(f"wrote {path}")


@app.command("model-info")
def model_info() -> None:
    """Load the configured base model and print its family, device and size."""

    def body() -> dict[str, Any]:
        from harness.models import load_pipeline

        cfg = load()
        loaded = load_pipeline(cfg.model, root=project_root())
        params = sum(p.numel() for p in loaded.pipeline.unet.parameters())
        return {
            "pretrained": cfg.model.pretrained,
            "kind": loaded.ref.kind,
            "family": loaded.family,
            "device": str(loaded.device),
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "unet_parameters": params,
        }

    echo(json.dumps(run_command(body), indent=2))


@app.command("resolve")
def resolve_cmd(
    out: Annotated[Path | None, typer.Option(help="Folder for the resolved files.")] = None,
) -> None:
    """Write resolved config sections and the raw-photo fingerprint (first DVC stage)."""

    def body() -> Path:
        from harness.compose import check_params
        from harness.stages import run_resolve

        cfg = load()
        for note in check_params(_state.params, project_root()):
            echo(f"note: {note}", err=True)
        return run_resolve(cfg, project_root(), out)

    echo(f"resolved config and sources in {run_command(body)}")


@app.command("prepare")
def prepare_cmd() -> None:
    """Prepare the subject dataset: decode, orient, crop, caption, dedupe, split."""

    def body() -> Any:
        from harness.stages import run_prepare

        with _held_warnings("harness.data") as held:
            return run_prepare(load(), project_root()), held

    results, warnings = run_command(body)
    for result in results:
        echo(
            f"prepared {result.n_train} train / {result.n_val} val photos "
            f"({result.n_rejected} rejected) in {result.out_dir}"
        )
        if result.token_choice is not None:
            choice = result.token_choice
            echo(
                f"identifier token: {result.token} (data.token: auto, seed {choice['seed']}, "
                f"{choice['tokenizer']}; recorded in manifest.json)"
            )
        warnings += getattr(result, "warnings", [])
    for warning in dict.fromkeys(warnings):  # each once, in order
        err_console.print(
            Text.assemble(("warning:", "yellow"), " ", warning), highlight=False, emoji=False
        )


@contextmanager
def _held_warnings(name: str) -> Iterator[list[str]]:
    """The warnings logged under logger ``name`` in the block, held back and returned instead
    of printed, so the command prints each once after its result (the prepare stage logs what
    it finds and also returns it). Other records pass on. If the block fails, the held warnings
    are logged after all, before its error, and a logged error that says what the raised one
    says is not repeated."""
    held: list[logging.LogRecord] = []
    root = logging.getLogger()

    class Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno in (logging.WARNING, logging.ERROR):
                held.append(record)
            else:
                root.handle(record)

    logger = logging.getLogger(name)
    hold, propagate = Hold(), logger.propagate
    logger.addHandler(hold)
    logger.propagate = False
    raised = ""
    messages: list[str] = []
    try:
        yield messages
    except BaseException as exc:
        raised = str(exc)
        raise
    finally:
        logger.removeHandler(hold)
        logger.propagate = propagate
        for record in held:
            if record.levelno == logging.WARNING and not raised:
                messages.append(record.getMessage())
            elif not (record.levelno == logging.ERROR and record.getMessage() == raised):
                root.handle(record)


@app.command("train")
def train_cmd(
    run_dir: Annotated[
        Path | None, typer.Option(help="Run folder (default: train.output_dir).")
    ] = None,
) -> None:
    """Train one LoRA with the configured settings; checkpoints at train.checkpoint_steps."""

    def body() -> Any:
        from harness.stages import run_train

        return run_train(load(), project_root(), run_dir)

    result = run_command(body)
    echo(f"{result.status}: {result.steps_done}/{result.max_steps} steps in {result.run_dir}")
    if result.status != "completed":
        err_console.print(f"[bold red]error:[/] training {result.status}: {result.reason}")
        raise typer.Exit(code=1)


@app.command("generate")
def generate_cmd(
    adapter: Annotated[
        Path | None, typer.Option(help="LoRA checkpoint folder or .safetensors; none = base model.")
    ] = None,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/generate"),
) -> None:
    """Generate the eval prompts x eval.images_per_prompt seeds with the eval settings.

    The prompts are eval.prompts, or the prepared subject's own (eval.prompt_source: dataset).
    Once the subject is prepared, its class noun fills {class_name} (for DreamBench, the
    dataset's class).
    """

    def body() -> int:
        from harness.stages import run_generate

        if adapter is not None and not adapter.exists():
            raise HarnessError(f"--adapter: {adapter}: not found")
        return len(run_generate(load(), project_root(), out, adapter))

    echo(f"generated {run_command(body)} images in {out} (manifest.jsonl)")


sweep_app = typer.Typer(
    help="Run the sweep (no sub-command), or work on a shared study: worker, launch, status.",
    invoke_without_command=True,
    rich_markup_mode="markdown",
)
app.add_typer(sweep_app, name="sweep")


@sweep_app.callback()
def sweep_cmd(ctx: typer.Context) -> None:
    """Run or continue the Optuna sweep, then print its summary (what `dvc repro` runs).

    Many workers may share one study: start more with `harness sweep worker` (or `launch`).
    """
    if ctx.invoked_subcommand is not None:
        return

    def body() -> Any:
        from harness.stages import run_sweep_stage

        return run_sweep_stage(load(), project_root())

    _print_summary(run_command(body))


def _print_summary(summary: Any) -> None:
    from harness.sweep.study import safe_storage_url

    echo(summary.describe())
    echo(f"study {summary.study_name}: optuna-dashboard {safe_storage_url(summary.storage)}")
    echo(f"results: {summary.results_csv} and {summary.results_parquet}")
    for row in summary.pareto[:5]:
        scores = ", ".join(f"{o}={row[f'score.{o}']:.3f}" for o in summary.objectives)
        echo(
            f"  pareto: run {row['run_key']} step {row['checkpoint_step']} "
            f"{row['setting_id']}: {scores}"
        )


@sweep_app.command("worker")
def sweep_worker_cmd() -> None:
    """One worker (one GPU): pull runs of the shared study until its budget is spent."""

    def body() -> Any:
        from harness.stages import run_sweep_stage

        # The tracker's summary task is `harness sweep`'s: N workers made N of them.
        return run_sweep_stage(load(), project_root(), summary_task=False)

    summary = run_command(body)
    echo(f"worker done: {summary.started_runs_this_call} runs trained here; {summary.describe()}")


@sweep_app.command("launch")
def sweep_launch_cmd(
    local: Annotated[
        int | None, typer.Option("--local", min=1, help="Start N workers on this machine.")
    ] = None,
    slurm: Annotated[
        bool, typer.Option("--slurm", help="Write and submit an sbatch array (launch.slurm).")
    ] = False,
    clearml_queue: Annotated[
        str | None, typer.Option("--clearml-queue", help="Enqueue workers for clearml-agent.")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            "-n",
            min=1,
            help="Workers of --slurm and --clearml-queue (default launch.workers).",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Write and show what would run; start nothing.")
    ] = False,
) -> None:
    """Start sweep workers on an engine: --local N, --slurm or --clearml-queue Q."""
    chosen = [
        name
        for name, on in (("--local", local), ("--slurm", slurm), ("--clearml-queue", clearml_queue))
        if on
    ]
    if len(chosen) != 1:
        err_console.print("[bold red]error:[/] choose one of --local N, --slurm, --clearml-queue Q")
        raise typer.Exit(code=2)
    if local is not None and workers is not None:
        err_console.print("[bold red]error:[/] --local N says how many workers; -n is not for it")
        raise typer.Exit(code=2)

    def body() -> int:
        cfg, root, params = load(), project_root(), _state.params.resolve()
        if local is not None:
            return _launch_local(root, params, local, dry_run)
        n = workers or cfg.launch.workers
        if slurm:
            return _launch_slurm(cfg, root, params, n, dry_run)
        assert clearml_queue is not None
        return _launch_clearml(cfg, root, params, n, clearml_queue, dry_run)

    code = run_command(body)
    if code:
        raise typer.Exit(code=code)


def _launch_local(root: Path, params: Path, n: int, dry_run: bool) -> int:
    from harness.sweep import launch

    if dry_run:
        for i, worker in enumerate(launch.local_workers(params, n, _state.overrides)):
            echo(f"worker {i}: {worker.describe()}")
        echo(f"not started (--dry-run); they would run in {root}")
        return 0
    codes = launch.launch_local(params, root, n, overrides=_state.overrides)
    echo(f"{len(codes)} workers finished; exit codes {codes}")
    return 2 if any(c != 0 for c in codes) else 0


def _launch_slurm(cfg: HarnessConfig, root: Path, params: Path, n: int, dry_run: bool) -> int:
    from harness.sweep import launch

    job = launch.launch_slurm(cfg, root, params, n, overrides=_state.overrides, submit=not dry_run)
    echo(job.text)
    echo(f"script: {job.script}")
    if job.job_id:
        echo(f"submitted: job {job.job_id} ({n} array tasks)")
    else:
        echo("not submitted (--dry-run)")
    return 0


def _launch_clearml(
    cfg: HarnessConfig, root: Path, params: Path, n: int, queue: str, dry_run: bool
) -> int:
    from harness.sweep import launch

    lines = launch.launch_clearml(
        cfg, root, params, n, queue, overrides=_state.overrides, enqueue=not dry_run
    )
    for line in lines:
        echo(line)
    return 0


@sweep_app.command("status")
def sweep_status_cmd() -> None:
    """Runs by state, per worker, and the budget left of this configuration's study."""

    def body() -> Any:
        from harness.stages import run_status

        return run_status(load(), project_root())

    for line in run_command(body).lines():
        echo(line)


@app.command("evaluate")
def evaluate_cmd() -> None:
    """Re-score the sweep's chosen points and the base model on fresh seeds.

    The best of many noisy points overstates its own score (selection bias); the confirmation
    score on seeds the sweep never used does not. Both are printed and tabled side by side.
    """

    def body() -> Any:
        from harness.stages import run_evaluate_stage

        return run_evaluate_stage(load(), project_root())

    confirmation = run_command(body)
    for line in confirmation.describe():
        echo(line)
    echo(f"results: {confirmation.results_csv} and {confirmation.results_parquet}")
    echo(f"metrics: {confirmation.metrics_path}")


@app.command("bench")
def bench_cmd(
    repeats: Annotated[
        int, typer.Option("--repeats", min=1, help="Timed passes per path, after a warm-up.")
    ] = 3,
    agreement: Annotated[
        bool,
        typer.Option(
            "--agreement",
            help="Instead: does the configured sampler rank the points as --reference does? "
            "Last line `agreement=<spearman>`.",
        ),
    ] = False,
    generation: Annotated[
        bool,
        typer.Option(
            "--generation",
            help="Instead: images/s with the LoRA scaled at run time, fused (eval.fuse_lora), "
            "with regional torch.compile (eval.compile), channels-last (eval.channels_last) "
            "and all three.",
        ),
    ] = False,
    reference: Annotated[
        str,
        typer.Option(
            "--reference", help="The reference sampler of --agreement: `<scheduler>:<steps>`."
        ),
    ] = "ddim:50",
) -> None:
    """Seconds per evaluated point: the harness against diffusers' example scripts.

    Same points, prompts and seeds through both paths (the naive one is what the example
    scripts do); the last line is `ratio=<naive / harness seconds per point>`.
    """

    def body() -> list[str]:
        import tempfile

        from harness.bench import (
            link_dvc_cache,
            rooted_config,
            run_agreement,
            run_bench,
            run_generation,
        )

        if agreement and generation:
            raise HarnessError("bench: --agreement and --generation are two benchmarks; pick one")
        # The bench works in a temporary folder: the project's model and subject paths are
        # made absolute, and its DVC cache linked there (photos may be links into it).
        cfg = rooted_config(load(), project_root())
        with tempfile.TemporaryDirectory(prefix="harness-bench-") as tmp:
            link_dvc_cache(project_root(), Path(tmp))
            if agreement:
                return run_agreement(cfg, Path(tmp), reference)
            if generation:
                return run_generation(cfg, Path(tmp), repeats)
            return run_bench(cfg, Path(tmp), repeats)

    for line in run_command(body):
        echo(line)


@app.command("report")
def report_cmd() -> None:
    """Write the comparison report: reports/index.html (self-contained) and summary.md.

    Built from the sweep's and the evaluate stage's outputs; the tracker gets both as a
    summary task.
    """

    def body() -> Path:
        from harness.stages import run_report_stage

        return run_report_stage(load(), project_root())

    html = run_command(body)
    from harness.report import SUMMARY_MD

    echo(f"summary: {_shown_path(html.with_name(SUMMARY_MD))}")
    echo(f"report: {_shown_path(html)}")


@app.command("export")
def export_cmd(
    point: Annotated[
        int | None,
        typer.Option(help="A point of runs/sweep/results.csv; default: the best confirmed one."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output folder; default: `runs/export/point-<n>`.")
    ] = None,
) -> None:
    """Export the best point as a LoRA with its inference setting and a model card.

    The point is the evaluate stage's best (confirmed on fresh seeds), else the sweep's best,
    or --point. The folder holds the adapter (diffusers, and kohya for A1111 and ComfyUI),
    inference.json, an example image and README.md, whose diffusers snippet reproduces it;
    after a sweep across subjects (data.subjects), one such folder per subject.
    """

    def body() -> Any:
        from harness.stages import run_export

        return run_export(load(), project_root(), point, out)

    result = run_command(body)
    names = ", ".join(path.name + ("/" if path.is_dir() else "") for path in result.files)
    subjects = sum(path.is_dir() for path in result.files)
    several = f" ({subjects} subjects)" if subjects else ""
    echo(f"exported point {result.point}{several} to {_shown_path(result.folder)}: {names}")


def _shown_path(path: Path) -> Path:
    """``path`` relative to the working directory when inside it."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return path


def main() -> None:
    """Console-script entry point."""
    app(prog_name="harness")


if __name__ == "__main__":  # pragma: no cover
    main()
