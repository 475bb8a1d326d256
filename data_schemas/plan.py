"""The run plan (plan.json): a comparison's settings resolved once, read by every later stage.

The compare flow builds it at the start and writes it beside splits.csv; `ctcompare train` builds a plan of its own
runs the same way. It holds each training run's resolved TrainConfig (key: arm, outer fold, share of the training
patients, training input size; its folder relative to the plan's folder), the split settings, the cost inputs and the
evaluation
settings. Profile and `--set` strings are resolved here and nowhere else: `--set` keys that are evaluation settings
(EVALUATION_SETTING_KEYS) go into `evaluation`, every other key is a TrainConfig override.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from data_schemas.arms import (
    ARM_MODES,
    MIN_IMAGE_SIZE,
    MODEL_NAMES,
    CanonicalArm,
    canonical_arm_name,
    parse_arm,
    parse_arms,
)
from data_schemas.base import StrictModel
from data_schemas.cost import CostInputs
from data_schemas.evaluation import EvaluationSettings
from data_schemas.files import read_model_json, write_model_json
from data_schemas.training import (
    KNOWN_SETTINGS,
    MAX_IMAGE_SIZE,
    SPLITS_FILE,
    ProfileName,
    TrainConfig,
    check_split_fractions,
    load_profiles,
    parse_override_value,
    resolve_train_config,
)

PLAN_FILE = "plan.json"
PLAN_SCHEMA_VERSION = "1.0"
EVALUATION_SETTING_KEYS: tuple[str, ...] = ("operating_point", "aggregation", "non_inferiority_margin")
ALL_SETTING_KEYS: tuple[str, ...] = KNOWN_SETTINGS + EVALUATION_SETTING_KEYS
Layout = Literal["comparison", "single-arm"]


class SplitSettings(StrictModel):
    """How the patient-level split is made.

    Args:
        seed: seeds every fold assignment.
        mode: "holdout": one test part (outer fold 0 of round(1 / test_fraction) folds); "cross-validated": K outer
            folds partition every labelled patient and each is the test part of one run.
        outer_folds: test folds that are run: 1 in hold-out mode, K in cross-validated mode.
        val_fraction: share of all patients carved, per outer fold, from the non-test patients for validation.
        test_fraction: hold-out mode's share of test patients (unused in cross-validated mode: 1 / K).
    """

    seed: int
    mode: Literal["holdout", "cross-validated"]
    outer_folds: int = Field(ge=1, le=20)
    val_fraction: float = Field(gt=0, lt=1)
    test_fraction: float = Field(gt=0, lt=1)

    @model_validator(mode="after")
    def _split_leaves_training_patients(self) -> SplitSettings:
        """Validation and test patients together must leave some patients for training."""
        check_split_fractions(self.val_fraction, self.test_fraction)
        return self


class PlannedRun(StrictModel):
    """One training run of the plan.

    Args:
        arm: which arm.
        outer_fold: the outer fold whose patients are the run's test part.
        train_fraction: share of the training patients used (data-efficiency curves), 1.0 for a main run.
        input_size: set only for a run of the input-size curve (`--sizes`): its training image size, which is
            also config.image_size; None for the main, fold and fraction runs (at the profile's size).
        run_dir: the run folder, relative to the folder holding plan.json (POSIX).
        config: the run's resolved training settings.
    """

    arm: CanonicalArm
    outer_fold: int = Field(ge=0)
    train_fraction: float = Field(gt=0, le=1)
    input_size: int | None = Field(default=None, ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE)
    run_dir: str
    config: TrainConfig


class RunPlan(StrictModel):
    """plan.json.

    Args:
        profile: the profile the settings started from.
        overrides: the `--set` training overrides as given (evaluation keys are in `evaluation`).
        seed: the seed of the split and of every run.
        arms: the arms compared (canonical names, data_schemas.arms).
        sizes: the training input sizes of the input-size curve (`--sizes`), ascending; empty without one.
        split: how the split is made.
        splits_file: the split file, relative to the plan's folder.
        evaluation: how test predictions become a verdict.
        cost: what the cost stage prices (None until the split gives the number of training images).
        runs: every training run.
    """

    schema_version: Literal["1.0"] = PLAN_SCHEMA_VERSION
    profile: ProfileName
    overrides: dict[str, str] = Field(default_factory=dict)
    seed: int
    arms: list[str]
    sizes: list[int] = Field(default_factory=list)
    split: SplitSettings
    splits_file: str = SPLITS_FILE
    evaluation: EvaluationSettings
    cost: CostInputs | None = None
    runs: list[PlannedRun]

    @field_validator("arms")
    @classmethod
    def _canonical_arms(cls, value: list[str]) -> list[str]:
        """Every arm under its canonical name, each once."""
        return [spec.name for spec in parse_arms(value)]

    def run(self, run_dir: str) -> PlannedRun:
        """The planned run whose folder is run_dir (relative, as in the plan); ValueError names the planned ones."""
        for planned in self.runs:
            if planned.run_dir == run_dir:
                return planned
        raise ValueError(f"run folder '{run_dir}' is not in the plan; planned: "
                         f"{', '.join(r.run_dir for r in self.runs)}.")

    def main_run(self, arm: str) -> PlannedRun:
        """The arm's run on outer fold 0 with every training patient at the profile's size."""
        arm = canonical_arm_name(arm)
        return next(r for r in self.runs if r.arm == arm and r.outer_fold == 0 and r.train_fraction == 1.0
                    and r.input_size is None)

    def pooled_runs(self, arm: str) -> list[PlannedRun]:
        """The arm's runs whose test predictions are pooled: one per outer fold, in fold order."""
        arm = canonical_arm_name(arm)
        return sorted((r for r in self.runs if r.arm == arm and r.train_fraction == 1.0 and r.input_size is None),
                      key=lambda r: r.outer_fold)

    def fraction_runs(self, arm: str) -> list[PlannedRun]:
        """The arm's runs on outer fold 0, by share of the training patients (the main run included)."""
        arm = canonical_arm_name(arm)
        return sorted((r for r in self.runs if r.arm == arm and r.outer_fold == 0 and r.input_size is None),
                      key=lambda r: r.train_fraction)

    def size_runs(self, arm: str) -> list[PlannedRun]:
        """The arm's input-size curve on outer fold 0, by training image size (the main run serves its own size);
        empty without `--sizes`."""
        arm = canonical_arm_name(arm)
        if not self.sizes:
            return []
        main = self.main_run(arm)
        curve = [r for r in self.runs if r.arm == arm and r.input_size is not None] + [main]
        return sorted(curve, key=lambda r: r.config.image_size)


class RunEnvironment(StrictModel):
    """What a comparison runs with besides its plan: machine-local facts, never written to plan.json.

    Args:
        weights: the ResNet-50 ImageNet weights file (resolved); None: the pretrained arms look in the torch hub
            cache or download.
        started_at: when the comparison started (time.time() seconds): the console command's start when one runs
            it, else the flow run's; the wall-time prediction counts from it.
    """

    weights: Path | None = None
    started_at: float


def split_overrides(settings: dict[str, str] | None) -> tuple[dict[str, str], dict[str, str]]:
    """`--set` pairs -> (training overrides, evaluation overrides); ValueError lists the known keys."""
    train, evaluation = {}, {}
    for key, value in (settings or {}).items():
        if key in EVALUATION_SETTING_KEYS:
            evaluation[key] = value
        elif key in KNOWN_SETTINGS:
            train[key] = value
        else:
            raise ValueError(f"unknown setting '{key}' in --set; known settings: {', '.join(ALL_SETTING_KEYS)}.")
    return train, evaluation


def resolve_evaluation(
    profile: str, folds: int | None, overrides: dict[str, str], n_bootstrap: int
) -> EvaluationSettings:
    """Profile defaults -> `--folds K` (cross-validated, K outer folds) -> `--set` values -> bootstrap count."""
    values: dict[str, Any] = dict(load_profiles()[profile].evaluation)
    if folds is not None:
        values.update(mode="cross-validated", outer_folds=folds)
    values.update({key: parse_override_value(text) for key, text in overrides.items()})
    values["n_bootstrap"] = n_bootstrap
    try:
        return EvaluationSettings.model_validate(values)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "evaluation"
        raise ValueError(f"invalid evaluation setting '{where}': "
                         f"{first['msg'].removeprefix('Value error, ').rstrip('.')}.") from None


def run_folder(layout: Layout, arm: str, outer_fold: int, fraction: float, cross_validated: bool,
               input_size: int | None = None) -> str:
    """Where a run lives, relative to the plan's folder.

    comparison: runs/<arm>/main (outer fold 0, all training patients), runs/<arm>/fold-<k>, runs/<arm>/fraction-<f>,
    runs/<arm>/size-<px> (the input-size curve); single-arm (`ctcompare train --out RUN_DIR`): RUN_DIR itself, or
    RUN_DIR/fold-<k> in cross-validated mode, RUN_DIR/size-<px> for a size. An arm name's ':' becomes '-' in the
    folder ('resnet18:imagenet' -> runs/resnet18-imagenet/main): a colon is not a portable file name character.
    """
    if layout == "single-arm":
        if input_size is not None:
            return f"size-{input_size}"
        return f"fold-{outer_fold}" if cross_validated else "."
    arm = arm.replace(":", "-")
    if input_size is not None:
        return f"runs/{arm}/size-{input_size}"
    if fraction < 1.0:
        return f"runs/{arm}/fraction-{fraction:g}"
    return f"runs/{arm}/main" if outer_fold == 0 else f"runs/{arm}/fold-{outer_fold}"


def _split_settings(configs: dict[str, TrainConfig], seed: int, evaluation: EvaluationSettings) -> SplitSettings:
    """One split for every arm: its fractions must not differ between arms."""
    fractions = {(c.val_fraction, c.test_fraction) for c in configs.values()}
    if len(fractions) != 1:
        raise ValueError("val_fraction and test_fraction must be the same for every arm: all arms share one split.")
    (val_fraction, test_fraction), = fractions
    cross_validated = evaluation.mode == "cross-validated"
    return SplitSettings(
        seed=seed, mode=evaluation.mode, outer_folds=evaluation.outer_folds if cross_validated else 1,
        val_fraction=val_fraction, test_fraction=test_fraction,
    )


def build_run_plan(
    *,
    profile: str,
    arms: list[str],
    seed: int,
    settings: dict[str, str] | None = None,
    folds: int | None = None,
    fractions: list[float] | None = None,
    sizes: list[int] | None = None,
    n_bootstrap: int = 1000,
    layout: Layout = "comparison",
) -> RunPlan:
    """Resolve every run's settings once; ValueError (one sentence) for a bad profile, arm, size or setting.

    sizes: the input-size curve: each arm is also trained on outer fold 0 at each of these training image sizes
    (a size equal to the arm's own image_size is its main run), on the same split.
    """
    if profile not in load_profiles():
        raise ValueError(f"unknown profile '{profile}'; choose one of {', '.join(load_profiles())}.")
    arms = check_arms(arms)
    sizes = check_sizes(sizes)
    train_overrides, evaluation_overrides = split_overrides(settings)
    evaluation = resolve_evaluation(profile, folds, evaluation_overrides, n_bootstrap)
    configs = {arm: resolve_train_config(profile, arm, train_overrides) for arm in arms}
    split = _split_settings(configs, seed, evaluation)
    cross_validated = split.mode == "cross-validated"
    runs = []
    for arm in arms:
        for outer_fold in range(split.outer_folds):
            runs.append(PlannedRun(arm=arm, outer_fold=outer_fold, train_fraction=1.0, config=configs[arm],
                                   run_dir=run_folder(layout, arm, outer_fold, 1.0, cross_validated)))
        for fraction in sorted(set(fractions or [])):
            if fraction < 1.0:
                config = configs[arm].model_copy(update={"train_fraction": fraction})
                runs.append(PlannedRun(arm=arm, outer_fold=0, train_fraction=fraction, config=config,
                                       run_dir=run_folder(layout, arm, 0, fraction, cross_validated)))
        runs.extend(_size_runs(arm, configs[arm], sizes, layout, cross_validated))
    return RunPlan(profile=profile, overrides=train_overrides, seed=seed, arms=list(arms), sizes=sizes, split=split,
                   evaluation=evaluation, runs=runs)


def check_arms(arms: list[str]) -> list[str]:
    """Canonical names of the arms, each once; ValueError naming the unknown ones and every valid choice."""
    unknown = []
    for arm in arms:
        try:
            parse_arm(arm)
        except ValueError:
            unknown.append(str(arm))
    if unknown or not arms:
        raise ValueError(
            f"unknown arm(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ARM_MODES)} (ResNet-50) "
            f"or MODEL:MODE with MODEL one of {', '.join(MODEL_NAMES)}, e.g. resnet18:imagenet."
        )
    return [spec.name for spec in parse_arms(arms)]  # ValueError for an arm listed twice


def check_sizes(sizes: list[int] | None) -> list[int]:
    """The input-size curve's sizes, ascending and once each; ValueError for a size outside the trainable range."""
    values = sorted(set(sizes or []))
    bad = [s for s in values if not MIN_IMAGE_SIZE <= int(s) <= MAX_IMAGE_SIZE or int(s) != s]
    if bad:
        raise ValueError(f"input sizes must be whole numbers of pixels from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}, "
                         f"got {bad[0]!r}.")
    return [int(s) for s in values]


def _size_runs(
    arm: str, config: TrainConfig, sizes: list[int], layout: Layout, cross_validated: bool
) -> list[PlannedRun]:
    """The arm's input-size runs on outer fold 0 (a size equal to its own image_size is the main run)."""
    return [
        PlannedRun(arm=arm, outer_fold=0, train_fraction=1.0, input_size=size,
                   config=config.model_copy(update={"image_size": size}),
                   run_dir=run_folder(layout, arm, 0, 1.0, cross_validated, input_size=size))
        for size in sizes if size != config.image_size
    ]


def with_cost_inputs(plan: RunPlan, *, n_train_images: int) -> RunPlan:
    """The plan with what the cost stage prices: the main run's training images at its settings.

    The imagenet arm's head-only warm-up is priced separately (head_warmup_epochs); its settings come from the
    plan when the arm is compared, else from the profile.
    """
    imagenet_arm = next((arm for arm in plan.arms if parse_arm(arm).mode == "imagenet"), None)
    imagenet = plan.main_run(imagenet_arm).config if imagenet_arm else resolve_train_config(
        plan.profile, "imagenet", plan.overrides)
    inputs = CostInputs(
        n_images=max(1, n_train_images), image_size=imagenet.image_size, channels=1, epochs=imagenet.epochs,
        batch_size=imagenet.batch_size, arms=list(plan.arms),
        head_warmup_epochs=min(imagenet.freeze_epochs, imagenet.epochs),
    )
    return plan.model_copy(update={"cost": inputs})


def write_plan(plan_dir: Path, plan: RunPlan) -> Path:
    """Write plan.json into plan_dir (atomically); returns its path."""
    path = Path(plan_dir) / PLAN_FILE
    write_model_json(path, plan)
    return path


def read_plan(path: Path) -> RunPlan:
    """Read and validate plan.json."""
    return read_model_json(Path(path), RunPlan)
