"""Export a chosen sweep point as a LoRA ready to use: the adapter file(s), the inference
setting it was chosen with (``inference.json``) and a model card (``README.md``, diffusers'
layout) whose snippet reproduces the point's images with diffusers alone.

A sweep's answer is a point: a checkpoint of a training run *and* an inference setting (guidance,
LoRA scales of the UNet and text encoder, scheduler, steps). The adapter alone, used at
diffusers' defaults, is not what was scored; the export keeps the two together::

    runs/export/point-<n>/
        pytorch_lora_weights.safetensors   diffusers format (pipe.load_lora_weights(folder))
        kohya_lora.safetensors             A1111/ComfyUI format (the run's, else converted;
                                           none for DoRA and rsLoRA adapters)
        inference.json                     base model, prompt, setting, scores, training
        example.png                        the point's image of the card's prompt and seed
        README.md                          model card with the diffusers snippet

The point is the evaluate stage's best (confirmed on fresh seeds), else the sweep's best by its
selection score, or ``--point N``. A point of a sweep across subjects (``data.subjects``) has
one adapter per subject: :func:`export_subjects` writes ``point-<n>/<subject>/``, each an
export as above with that subject's token, class noun, scores and image, and an index
``README.md``.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from harness.config import HarnessConfig, InferenceSetting
from harness.errors import HarnessError
from harness.outputs import read_table
from harness.report.figures import label
from harness.sweep.confirm import METRICS, optional_number
from harness.train.layout import KOHYA_WEIGHTS as KOHYA_FILE

__all__ = [
    "EXPORT_DIR",
    "Export",
    "choose_point",
    "export_point",
    "export_subjects",
    "lora_layout",
    "model_card",
]

logger = logging.getLogger(__name__)

EXPORT_DIR = "runs/export"
INFERENCE_JSON = "inference.json"
EXAMPLE_IMAGE = "example.png"


class ExportError(HarnessError):
    """The point cannot be exported: no results, no such point, its adapter is gone."""


@dataclass(frozen=True)
class Export:
    """What :func:`export_point` wrote."""

    folder: Path
    point: int
    files: list[Path]


def choose_point(
    cfg: HarnessConfig, root: Path, point: int | None = None, *, multi_subject: bool = False
) -> dict[str, Any]:
    """The results row of ``point``, or of the best point: the evaluate stage's first (its
    confirmation scores added as ``confirm.*`` and ``baseline.*``), else the sweep's best by
    its selection score among full-fidelity points.

    Raises:
        ExportError: no sweep results, no such point, its adapter was removed, or a point of
            several subjects without ``multi_subject`` (it has no one adapter to export).
    """
    from harness.sweep.confirm import EvaluateError, read_sweep_results

    try:
        frame = read_sweep_results(cfg, root)
    except EvaluateError as exc:
        raise ExportError(str(exc)) from None
    confirmed = _confirmed(cfg, root, frame)
    if point is None:
        if confirmed is not None:
            point = int(confirmed.iloc[0]["point"])
        else:
            point = _best_swept_point(cfg, frame)
    rows = frame[frame["point"] == point]
    if rows.empty:
        raise ExportError(
            f"--point {point}: no such point in {cfg.sweep.dir}/results.parquet "
            f"(points {int(frame['point'].min())}..{int(frame['point'].max())})"
        )
    row: dict[str, Any] = rows.iloc[0].to_dict()
    if not isinstance(row.get("adapter"), str) or not (root / row["adapter"]).is_dir():
        raise ExportError(
            f"point {point}: its adapter was removed (sweep.keep_adapters keeps the Pareto "
            "points' by default); export a point on the front, or sweep with keep_adapters: all"
        )
    several = row.get("subjects", 1) not in (None, 1) and not pd.isna(row.get("subjects"))
    if several and not multi_subject:
        raise ExportError(
            f"point {point}: a multi-subject point has one adapter per subject; export it "
            "with the sweep's data.subjects"
        )
    if confirmed is not None:
        mine = confirmed[confirmed["point"] == point]
        if not mine.empty:
            extra = mine.iloc[0].to_dict()
            row.update({k: v for k, v in extra.items() if k.startswith(("confirm.", "baseline"))})
    return row


def _best_swept_point(cfg: HarnessConfig, frame: pd.DataFrame) -> int:
    """The sweep's best full-fidelity point by its selection score (no evaluate output).

    Raises:
        ExportError: no point has reached the full protocol yet (adaptive evaluation keeps
            the cheap rungs' points out: they rank nothing).
    """
    from harness.sweep.results import full_fidelity
    from harness.sweep.select import select_points

    chosen = select_points(cfg, full_fidelity(frame))
    if chosen.empty:
        raise ExportError(
            f"{cfg.sweep.dir}/results.parquet: no point measured with the full protocol yet "
            "(and no evaluate output); sweep on until one is, or export one with --point N"
        )
    return int(chosen.iloc[0]["point"])


def _confirmed(cfg: HarnessConfig, root: Path, frame: pd.DataFrame) -> pd.DataFrame | None:
    """The evaluate stage's table, best first, when it is of this sweep's points."""
    path = root / cfg.evaluate.dir / "results.parquet"
    if not path.is_file():
        return None
    table = read_table(path, "harness evaluate", ExportError).sort_values("selection_rank")
    ours = table.merge(frame[["point", "run_key", "setting_id"]], how="inner")
    return ours if len(ours) == len(table) and not ours.empty else None


def export_point(
    cfg: HarnessConfig,
    root: Path,
    row: dict[str, Any],
    out: Path,
    *,
    token: str,
    class_name: str,
) -> Export:
    """Write the export of results ``row`` into ``out`` (replaced when it exists)."""
    from harness.generate import LORA_WEIGHTS, resolve_adapter
    from harness.sweep.confirm import point_setting

    folder, weights = resolve_adapter(root / row["adapter"])  # safetensors, checked
    family, components = lora_layout(folder / weights)  # a bad checkpoint.json: nothing lost
    setting = point_setting(cfg, row)  # likewise: what can fail is read before out goes
    example = _example(root, row)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    files = [Path(shutil.copy2(folder / weights, out / LORA_WEIGHTS))]
    kohya, why_not = _kohya_file(folder, weights, out, family)
    files += [kohya] if kohya else []
    if example is not None:
        files.append(Path(shutil.copy2(root / example["image"], out / EXAMPLE_IMAGE)))
    info = inference_info(cfg, root, row, setting, token, class_name, example)
    info["family"], info["lora_components"] = family, components
    info["kohya"] = kohya is not None
    if why_not:
        info["kohya_not_written"] = why_not
    (out / INFERENCE_JSON).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    (out / "README.md").write_text(model_card(info), encoding="utf-8")
    files += [out / INFERENCE_JSON, out / "README.md"]
    return Export(out, int(row["point"]), files)


def export_subjects(
    cfg: HarnessConfig,
    root: Path,
    row: dict[str, Any],
    out: Path,
    subjects: Mapping[str, tuple[str, str]],
) -> Export:
    """Write the export of multi-subject point ``row`` (its results row: the mean over
    subjects) into ``out``: ``out/<subject>/`` as :func:`export_point` writes it for that
    subject's adapter, token and class noun (``subjects``: ``{name: (token, class noun)}``)
    and its own scores and images, and ``out/README.md`` listing them.

    Every subject's adapter is checked before ``out`` is replaced, so a missing one loses no
    earlier export.

    Raises:
        ExportError: the sweep's per-subject table is missing or lacks a subject of the point.
    """
    from harness.generate import resolve_adapter

    rows = _subject_rows(cfg, root, int(row["point"]), subjects)
    for name, scores in _subject_confirmations(cfg, root, row, subjects).items():
        rows[name].update(scores)
    for one in rows.values():
        folder, weights = resolve_adapter(root / one["adapter"])
        lora_layout(folder / weights)
    if out.exists():
        shutil.rmtree(out)
    for name, (token, class_name) in subjects.items():
        export_point(cfg, root, rows[name], out / name, token=token, class_name=class_name)
    index = out / "README.md"
    index.write_text(_subjects_index(cfg, root, row, rows, subjects), encoding="utf-8")
    return Export(out, int(row["point"]), [*(out / name for name in subjects), index])


def _subject_rows(
    cfg: HarnessConfig, root: Path, point: int, subjects: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """``{subject: its row of the sweep's per-subject table}`` for ``point``."""
    from harness.sweep.results import MEAN_SUBJECT, SUBJECTS_PARQUET

    path = root / cfg.sweep.dir / SUBJECTS_PARQUET
    if not path.is_file():
        raise ExportError(f"{path}: no per-subject table; rerun `harness sweep` to write it")
    table = read_table(path, "harness sweep", ExportError)
    mine = table[(table["point"] == point) & (table["subject"] != MEAN_SUBJECT)]
    rows = {str(r["subject"]): r for r in mine.to_dict(orient="records")}
    missing = sorted(set(subjects) - set(rows))
    if missing:
        raise ExportError(f"{path}: point {point} has no row for subject(s) {missing}")
    return rows


def _subject_confirmations(
    cfg: HarnessConfig, root: Path, row: dict[str, Any], subjects: Mapping[str, Any]
) -> dict[str, dict[str, float]]:
    """Each subject's ``confirm.*`` and ``baseline.*`` scores of a confirmed point: the means
    of its own images in the evaluate stage's per-image table (its results table has only
    their mean); {} for a point the evaluate stage did not confirm."""
    from harness.report.data import PER_IMAGE

    path = root / cfg.evaluate.dir / PER_IMAGE
    if not any(k.startswith("confirm.") for k in row) or not path.is_file():
        return {}
    images = read_table(path, "harness evaluate", ExportError)
    if "subject" not in images:
        return {}
    base_setting = row.get("baseline_setting")
    if not isinstance(base_setting, str):  # absent or NaN: the point's own setting
        base_setting = row["setting_id"]
    is_base = images["baseline"].astype(bool)
    confirmed = (images["point"] == int(row["point"])) & ~is_base
    base = is_base & (images["setting_id"] == base_setting)
    out: dict[str, dict[str, float]] = {}
    for name in subjects:
        mine = images["subject"] == name
        out[name] = {
            f"{prefix}{m}": float(images.loc[rows_of & mine, m].mean())
            for prefix, rows_of in (("confirm.", confirmed), ("baseline.", base))
            for m in METRICS
            if (rows_of & mine).any()
        }
    return out


def _subjects_index(
    cfg: HarnessConfig,
    root: Path,
    row: dict[str, Any],
    rows: Mapping[str, dict[str, Any]],
    subjects: Mapping[str, tuple[str, str]],
) -> str:
    """The ``README.md`` of a multi-subject export: the point, its setting, and one line per
    subject (folder, class noun, its sweep scores) with the mean."""
    from harness.sweep.confirm import point_setting
    from harness.sweep.study import study_id

    setting = point_setting(cfg, row)
    trained = bool(row.get("train.train_text_encoder", cfg.train.train_text_encoder))
    text_encoder = f"{setting.text_encoder_lora_scale:g}" if trained else "none"
    head = "| subject | folder | class | " + " | ".join(label(m) for m in METRICS) + " |"
    lines = [
        f"# DreamBooth LoRAs: point {row['point']} of the sweep `{study_id(cfg, root)}`",
        "",
        f"One configuration (run {row['run_key']}, checkpoint step {row['checkpoint_step']}) "
        f"trained once per subject; each folder is that subject's LoRA with its own model "
        f"card. Inference setting `{row['setting_id']}`: guidance {setting.guidance_scale:g}, "
        f"{setting.num_inference_steps} steps of {setting.scheduler}, LoRA scale UNet "
        f"{setting.lora_scale:g}, text encoder {text_encoder}.",
        "",
        "Sweep scores (each subject's own; the point was chosen by their mean; each card has "
        "the subject's confirmed and base-model scores too):",
        "",
        head,
        "|---|---|---|" + "---|" * len(METRICS),
    ]
    for name, (_, class_name) in subjects.items():
        scores = " | ".join(_fmt(optional_number(rows[name].get(f"score.{m}"))) for m in METRICS)
        lines.append(f"| {name} | `{name}/` | {class_name} | {scores} |")
    mean = " | ".join(_fmt(optional_number(row.get(f"score.{m}"))) for m in METRICS)
    lines += [f"| mean | | | {mean} |", ""]
    return "\n".join(lines)


def lora_layout(weights: Path) -> tuple[str, list[str]]:
    """(model family, LoRA components) of an adapter's weights file, without loading a tensor.

    The components are the file's key prefixes (``unet``, ``text_encoder``,
    ``text_encoder_2``): what :func:`harness.generate.set_lora_scales` scales, so what the
    card's snippet must scale. The family comes from the checkpoint's ``checkpoint.json`` beside
    the file (without one, a second text encoder means SDXL)."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        keys = handle.keys()  # names only: no tensor is read
    components = sorted({key.split(".", 1)[0] for key in keys})
    family = _checkpoint_meta(weights.parent).get("family")
    if family is None:
        family = "sdxl" if "text_encoder_2" in components else "sd15"
    return str(family), components


def _checkpoint_meta(folder: Path) -> dict[str, Any]:
    """The ``checkpoint.json`` of an adapter's checkpoint folder ({} for a bare file's folder).

    Raises:
        ExportError: the file is there but not a JSON object (naming it), before anything is
            written.
    """
    from harness.train.layout import CHECKPOINT_JSON

    meta = folder / CHECKPOINT_JSON
    if not meta.is_file():
        return {}
    try:
        value = json.loads(meta.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{meta}: not a JSON object ({exc})") from None
    if not isinstance(value, dict):
        raise ExportError(f"{meta}: not a JSON object (a {type(value).__name__})")
    return value


def _kohya_file(folder: Path, weights: str, out: Path, family: str) -> tuple[Path | None, str]:
    """``out/kohya_lora.safetensors`` (A1111, ComfyUI): the run's own when it wrote one
    (``train.export_kohya``), else converted from the diffusers file; or why there is none
    (DoRA and rsLoRA adapters have no kohya form), logged."""
    from harness.train.kohya import KohyaUnsupported, kohya_from_diffusers

    if (folder / KOHYA_FILE).is_file():
        return Path(shutil.copy2(folder / KOHYA_FILE, out / KOHYA_FILE)), ""
    layout = _checkpoint_meta(folder).get("unet_layout")
    try:
        return kohya_from_diffusers(folder / weights, out / KOHYA_FILE, family, layout), ""
    except (KohyaUnsupported, KeyError, ValueError) as exc:
        # A module outside the standard SD layout has no kohya name either (KeyError,
        # ValueError): the diffusers file, already exported, is what this point ships.
        reason = str(exc) if isinstance(exc, KohyaUnsupported) else f"no kohya name: {exc}"
        logger.warning("export: no %s: %s", KOHYA_FILE, reason)
        return None, reason


def _example(root: Path, row: dict[str, Any]) -> dict[str, Any] | None:
    """The point's first image (its prompt, seed and file): from the confirmation when there
    is one, else from the sweep's evaluation."""
    for key in ("confirm.images_dir", "images_dir"):
        folder = row.get(key)
        if not isinstance(folder, str):
            continue
        manifest = root / folder / "manifest.jsonl"  # the point's own: its images only
        if not manifest.is_file():
            continue
        for line in manifest.read_text(encoding="utf-8").splitlines():
            try:  # a line torn by a crash, or a hand edit: the next image will do
                entry = json.loads(line)
                image = manifest.parent / entry["file"]
            except (ValueError, KeyError, TypeError):
                continue
            if image.is_file() and "prompt" in entry and "seed" in entry:
                return {
                    "prompt": entry["prompt"],
                    "seed": int(entry["seed"]),
                    "image": str(image.relative_to(root)),
                }
    return None


def inference_info(
    cfg: HarnessConfig,
    root: Path,
    row: dict[str, Any],
    setting: InferenceSetting,
    token: str,
    class_name: str,
    example: dict[str, Any] | None,
) -> dict[str, Any]:
    """``inference.json``: what the card's snippet needs, and where the point came from."""
    from harness.models import parse_model_ref, rooted_model
    from harness.models.tiny import tiny_pipeline_dir
    from harness.sweep.study import study_id

    ref = parse_model_ref(cfg.model.pretrained, root)  # a relative path starts at the root
    # The card's snippet runs in the export folder, not at the root: a relative local model
    # (or config folder) there is no folder, and diffusers would take it for a hub id.
    model = rooted_model(cfg.model, root)
    # The harness's own test models have a diffusers folder diffusers can load.
    base = str(tiny_pipeline_dir(ref.value)) if ref.kind == "tiny" else model.pretrained  # type: ignore[arg-type]
    text_encoder = bool(row.get("train.train_text_encoder", cfg.train.train_text_encoder))
    training = {
        k.removeprefix("train."): _plain(v) for k, v in row.items() if k.startswith("train.")
    }
    return {
        "base_model": base,
        "base_model_kind": ref.kind,
        "revision": cfg.model.revision,
        "variant": cfg.model.variant,
        "single_file_config": model.single_file_config,
        "instance_prompt": f"a photo of {token} {class_name}",
        "token": token,
        "class_name": class_name,
        "example": example,
        "guidance_scale": setting.guidance_scale,
        "num_inference_steps": setting.num_inference_steps,
        "scheduler": setting.scheduler,
        "lora_scale": setting.lora_scale,
        "text_encoder_lora": text_encoder,
        "text_encoder_lora_scale": setting.text_encoder_lora_scale if text_encoder else None,
        "resolution": cfg.eval.resolution or cfg.data.resolution,
        "study": study_id(cfg, root),
        "point": int(row["point"]),
        "run_key": row["run_key"],
        "checkpoint_step": int(row["checkpoint_step"]),
        "setting_id": row["setting_id"],
        "scores": {
            kind: {m: optional_number(row.get(f"{prefix}{m}")) for m in METRICS}
            for kind, prefix in (
                ("sweep", "score."),
                ("confirmed", "confirm."),
                ("base", "baseline."),
            )
        },
        "training": training,
    }


def _plain(value: Any) -> Any:
    """A results-table cell as JSON: NaN (a parameter the run did not use) as null, the lists
    the table holds as JSON text as lists, numpy scalars as Python ones."""
    if isinstance(value, float) and pd.isna(value):
        return None
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value.item() if hasattr(value, "item") else value


def usage_snippet(info: dict[str, Any], folder: str = ".") -> str:
    """Python that loads the base model and the LoRA with diffusers alone and generates the
    example prompt under the point's setting (as the sweep generated it: a CPU generator per
    image, the model's own scheduler config with the swept scheduler's class)."""
    from harness.generate import SCHEDULER_CLASSES, SCHEDULER_OPTIONS

    scheduler = SCHEDULER_CLASSES[info["scheduler"]]
    extra = "".join(f", {k}={v!r}" for k, v in SCHEDULER_OPTIONS.get(info["scheduler"], {}).items())
    example = info.get("example") or {"prompt": info["instance_prompt"], "seed": 0}
    if info["base_model_kind"] == "single_file":
        sdxl = info["family"] == "sdxl"
        pipeline = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
        # The components' configs the sweep loaded the file with (diffusers' ``config``):
        # inferred ones can differ (another scheduler or text encoder), so another image.
        config = info.get("single_file_config")
        options = f", config={config!r}" if config is not None else ""
        load = f"{pipeline}.from_single_file(BASE, torch_dtype=dtype{options})"
    else:
        pipeline = "DiffusionPipeline"
        options = "".join(
            f", {k}={info[k]!r}" for k in ("revision", "variant") if info.get(k) is not None
        )
        load = f"DiffusionPipeline.from_pretrained(BASE, torch_dtype=dtype{options})"
    # Every component the adapter has, scaled as the sweep scaled it (SDXL: both encoders).
    te_scale = info["text_encoder_lora_scale"]
    weights = {c: info["lora_scale"] if c == "unet" else te_scale for c in info["lora_components"]}
    return "\n".join(
        [
            "import torch",
            f"from diffusers import {pipeline}, {scheduler}",
            "",
            f"BASE = {info['base_model']!r}",
            f"LORA = {folder!r}  # this folder",
            'device = "cuda" if torch.cuda.is_available() else "cpu"',
            'dtype = torch.float16 if device == "cuda" else torch.float32',
            f"pipe = {load}.to(device)",
            f"pipe.scheduler = {scheduler}.from_config(pipe.scheduler.config{extra})",
            'pipe.load_lora_weights(LORA, adapter_name="subject")',
            "# The LoRA scales the sweep chose, per component.",
            f'pipe.set_adapters(["subject"], adapter_weights=[{weights!r}])',
            "image = pipe(",
            f"    {example['prompt']!r},",
            f"    guidance_scale={info['guidance_scale']!r},",
            f"    num_inference_steps={info['num_inference_steps']!r},",
            f"    height={info['resolution']!r},",
            f"    width={info['resolution']!r},",
            f'    generator=torch.Generator("cpu").manual_seed({example["seed"]!r}),',
            ").images[0]",
            'image.save("sample.png")',
        ]
    )


def model_card(info: dict[str, Any]) -> str:
    """The ``README.md`` of an export: diffusers' model-card front matter, the scores, the
    snippet, the training settings."""
    te = (
        f"{info['text_encoder_lora_scale']:g}"
        if info["text_encoder_lora"]
        else "none (no text-encoder LoRA)"
    )
    example = info.get("example")
    lines = [
        "---",
        f"base_model: {json.dumps(info['base_model'])}",
        "library_name: diffusers",
        "tags: [text-to-image, diffusers, lora, dreambooth]",
        f"instance_prompt: {json.dumps(info['instance_prompt'])}",
        "---",
        "",
        f"# DreamBooth LoRA: {info['token']} {info['class_name']}",
        "",
        f"Chosen by the sweep `{info['study']}`: point {info['point']} (run {info['run_key']}, "
        f"checkpoint step {info['checkpoint_step']}, inference setting `{info['setting_id']}`). "
        f"Use the identifier in prompts: `{info['instance_prompt']}`.",
        "",
        *_scores_table(info["scores"]),
        "",
        "## Use it with diffusers",
        "",
        "The scores hold for this inference setting, not for diffusers' defaults: guidance "
        f"{info['guidance_scale']:g}, {info['num_inference_steps']} steps of {info['scheduler']}, "
        f"LoRA scale UNet {info['lora_scale']:g}, text encoder {te}, "
        f"{info['resolution']} px.",
        "",
        "```python",
        usage_snippet(info),
        "```",
        "",
        *(
            [f"![example: {example['prompt']}, seed {example['seed']}]({EXAMPLE_IMAGE})", ""]
            if example
            else []
        ),
        "Files: `pytorch_lora_weights.safetensors` (diffusers), "
        + (f"`{KOHYA_FILE}` (A1111/ComfyUI), " if info.get("kohya") else "")
        + f"`{INFERENCE_JSON}` (all of the above, machine-readable).",
        "",
        "## Training settings",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {k} | {json.dumps(v)} |" for k, v in sorted(info["training"].items())),
        "",
    ]
    return "\n".join(lines)


def _scores_table(scores: dict[str, dict[str, float | None]]) -> list[str]:
    """The card's scores: the sweep's, the confirmation's and the base model's."""
    return [
        "| metric | sweep | confirmed on fresh seeds | base model, same setting |",
        "|---|---|---|---|",
        *(
            f"| {label(m)} | {_fmt(scores['sweep'][m])} | {_fmt(scores['confirmed'][m])} | "
            f"{_fmt(scores['base'][m])} |"
            for m in METRICS
        ),
    ]


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"
