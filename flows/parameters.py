"""Every flow parameter's description and bounds, in one place.

The flows annotate their parameters with the types below, so the Prefect UI's parameter form shows each one's
description and bounds; `ctcompare --help` prints the same text (help_for); and each command checks its arguments
against its flow's own signature before Prefect starts and before any folder is made (check_flow_parameters).
Importing this module imports pydantic and the schemas only: it starts nothing and never imports Prefect or torch.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, TypeAdapter
from pydantic.fields import FieldInfo
from pydantic.json_schema import SkipJsonSchema

from data_schemas.arms import ARM_CHOICES, MIN_IMAGE_SIZE
from data_schemas.cost import CostInputs, WallTimePlan
from data_schemas.plan import RunPlan
from data_schemas.training import MAX_IMAGE_SIZE, ProfileName

if TYPE_CHECKING:
    from prefect import Flow

MAX_SEED = 2**32 - 1  # numpy's seed range
ArmChoice = Literal[ARM_CHOICES]  # type: ignore[valid-type]  # the form offers (and checks) each canonical arm name
WINDOW_PATTERN = r"^\s*(lung|mediastinal|bone|none|-?\d+(\.\d+)?\s*,\s*\d+(\.\d+)?)\s*$"
# Said of every path parameter: a form in the UI does not tell where the flow run's process is.
RELATIVE_PATHS = ("a relative path resolves against the current folder, in a deployment's flow run against the "
                  "worker's checkout")
LABELS_FORMAT = ("a CSV with one key column (patient_id, study_instance_uid, series_instance_uid, sop_instance_uid "
                 "or path) and a 'label' column")


def described(**kwargs: Any) -> FieldInfo:
    """pydantic.Field(...) with the description also under json_schema_extra: Prefect's form builder wraps each
    parameter
    in a Field of its own whose description (None without a docstring entry) hides the annotation's, but keeps this."""
    if "description" in kwargs:
        kwargs["json_schema_extra"] = {"description": kwargs["description"]}
    return Field(**kwargs)


# ------------------------------------------------------------------------------------------- shared parameters
Seed = Annotated[int, described(ge=0, le=MAX_SEED, description="random seed of the split, the training runs and the "
                            "bootstrap; the same seed and data give the same numbers")]
CohortSeed = Annotated[int, described(ge=0, le=MAX_SEED, description="random seed of the cohort: the same seed and "
                                  "settings write the same patients, images and labels")]
IngestSize = Annotated[int, described(
    ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE,
    description="ingest size: each DICOM image is stored in the dataset as size x size pixels. Not the training "
    "input size, which is the profile's image_size setting (settings in a flow run, --set image_size=N in a "
    "terminal)")]
OldIngestSizeName = Annotated[Annotated[int, described(ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE)] | None, described(
    description="the old name of ingest_size, still accepted for deployments made before the rename (the run logs "
    "that it was used); empty: ingest_size decides")]
Window = Annotated[str, described(pattern=WINDOW_PATTERN, description="CT window applied at ingest: lung, mediastinal, "
                              "bone, none, or 'LEVEL,WIDTH' in Hounsfield units")]

# ------------------------------------------------------------------------------------------------------ compare
CompareSource = Annotated[str, described(description="a DICOM folder (ingested once, beside the report folder, into "
                                     "a folder named after it with -dataset added) or a dataset folder made by "
                                     f"'ctcompare ingest'; {RELATIVE_PATHS}")]
ReportFolder = Annotated[str, described(description="report folder (report.html, results.json, the runs); index.html "
                                    f"in its parent lists every report there; {RELATIVE_PATHS}")]
CompareLabels = Annotated[str | None, described(description=f"labels file of a DICOM source, {LABELS_FORMAT}; required "
                                            f"for a DICOM source, unused for a dataset folder; {RELATIVE_PATHS}")]
Profile = Annotated[ProfileName, described(description="settings profile: smoke (seconds, numbers not meaningful), cpu "
                                       "(a laptop), full (a GPU)")]
Arms = Annotated[list[ArmChoice], described(  # type: ignore[valid-type]
    min_length=1, description="arms to train, each one of the listed choices: a bare mode is ResNet-50 (scratch: "
    "from random initialisation; imagenet: from ImageNet weights, fine-tuned; imagenet-linear: frozen ImageNet "
    "features and a logistic regression), MODEL:MODE another model (resnet18: ResNet-18, mobilenet_v3_large: "
    "MobileNetV3-Large)")]
WeightsFile = Annotated[str | None, described(description="ImageNet ResNet-50 weights (a torchvision-format state "
                                                          "dict) "
                                          "for the pretrained arms; without it they use the torch hub cache or "
                                          f"download, else are skipped; {RELATIVE_PATHS}")]
Folds = Annotated[Annotated[int, described(ge=2, le=20)] | None, described(
    description="cross-validated evaluation with K outer folds (every labelled patient tested once, predictions "
    "pooled); empty: the profile's (full: 5 folds; smoke, cpu: one hold-out test part)")]
Fractions = Annotated[list[Annotated[float, described(gt=0, le=1, allow_inf_nan=False)]] | None, described(
    description="data-efficiency curve: also train each arm on these shares of the training patients, "
    "e.g. 0.1,0.25,0.5,1")]
TrainSizes = Annotated[list[Annotated[int, described(ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE)]] | None, described(
    description="input-size curve: also train each arm at these training input sizes in pixels "
    "on the same split, resized from one ingest at the largest")]
Settings = Annotated[dict[str, str] | None, described(description="profile settings to override, KEY -> VALUE (e.g. "
                                                  "epochs -> 3, image_size -> 112; in a terminal --set KEY=VALUE)")]
Bootstrap = Annotated[int, described(ge=10, le=100_000, description="patient-level bootstrap resamples for the 95% "
                                 "intervals")]
Calibrate = Annotated[bool, described(description="measure this machine's speed (about 20 s once, cached) for the cost "
                                  "estimate instead of the device catalogue's guess")]
ParallelArms = Annotated[int, described(ge=1, le=16, description="training runs at once in this flow run (1: each run "
                                    "uses every core)")]
NewFolderPerRun = Annotated[bool, described(description="write each run into a new folder inside the report folder, "
                                        "named by its UTC start time (e.g. 20260105T030000Z), so scheduled runs keep "
                                        "every report; otherwise a re-run into the same report folder reuses the runs "
                                        "trained there")]
# Not in the run form (SkipJsonSchema): a person cannot fill in a whole run plan; the command line passes the one it
# checked, and a flow run from the form resolves its own from the parameters above.
CheckedPlan = Annotated[RunPlan | None, SkipJsonSchema(), described(
    description="the run plan already resolved from the parameters above; empty: resolved at the start of the flow "
                "run")]
TrainDeployment = Annotated[str | None, described(description="run each training run as a flow run of this deployment "
                                              "(e.g. train/arm) on its work pool; the dataset and the report folder "
                                              "must be at the same path on every worker")]


# ------------------------------------------------------------------------------------------------------- ingest
DicomFolder = Annotated[str, described(description="folder of DICOM files, searched recursively, any file extension; "
                                   f"{RELATIVE_PATHS}")]
DatasetFolder = Annotated[str, described(description="dataset folder to write; re-running into it is incremental; "
                                     f"{RELATIVE_PATHS}")]
IngestLabels = Annotated[str | None, described(description=f"labels file, {LABELS_FORMAT}; a comparison trains on "
                                           f"labelled images only, so without it the dataset cannot be compared on; "
                                           f"{RELATIVE_PATHS}")]
Workers = Annotated[int, described(ge=0, le=256, description="decode worker processes; 0: one per core")]
DaskAddress = Annotated[str | None, described(description="run the decode chunks on this Dask scheduler, e.g. "
                                          "tcp://host:8786")]
AllowBurnedIn = Annotated[bool, described(description="include files marked BurnedInAnnotation YES and Secondary "
                                      "Capture objects, whose pixels may show names; quarantined by default")]

# ------------------------------------------------------------------------------------------- DICOMweb ingest
DicomWebUrl = Annotated[str, described(pattern=r"^https?://[^\s@/]+(/\S*)?$", description="DICOMweb base URL of the "
                                   "archive, e.g. http://pacs:8042/dicom-web (credentials never in it)")]
StudyDate = Annotated[str, described(pattern=r"^\s*(yesterday|today|any|\d{8}(-\d{8})?)\s*$", description="studies "
                                 "of this StudyDate: YYYYMMDD, a range YYYYMMDD-YYYYMMDD, yesterday, today (local "
                                 "time) or any")]
Modality = Annotated[str, described(pattern=r"^[A-Z]{2,16}$", description="series of this Modality only, e.g. CT")]
Accession = Annotated[str | None, described(description="only the study with this AccessionNumber")]
StudyUidsFile = Annotated[str | None, described(description="only the studies listed in this text file, one "
                                            "StudyInstanceUID a line")]
CredentialsBlock = Annotated[str | None, described(description="name of a Prefect Secret block holding the archive's "
                                               "user:password or token; empty: CTCOMPARE_DICOMWEB_USER and "
                                               "_PASSWORD (or _TOKEN) from the environment, else none")]
DicomSource = Annotated[str, described(description="folder of DICOM files (searched recursively, any file extension), "
                                   "or a DICOMweb base URL whose studies the study filters select")]
SendUrl = Annotated[str | None, described(pattern=r"^https?://[^\s@/]+(/\S*)?$", description="store the DICOM SR "
                                       "of each study in this DICOMweb archive (STOW-RS), e.g. the source archive")]
Overlay = Annotated[bool, described(description="also write (and send) a GradCAM overlay per study as a DICOM "
                                  "secondary capture, marked derived and not for diagnosis")]
FetchThreads = Annotated[int, described(ge=1, le=32, description="instance retrievals running at once")]

# --------------------------------------------------------------------------------------------- cost and train
CostOutFolder = Annotated[Path, described(description="folder for cost.json")]
CostInputsParameter = Annotated[CostInputs, described(description="what to price: training images, image size, "
                                                                  "channels, "
                                                "epochs, batch size, arms, precision, optimizer")]
Force = Annotated[bool, described(description="recompute even when cost.json was made from the same inputs")]
WallTimePlanParameter = Annotated[
    WallTimePlan | None,
    described(
        description="a whole comparison's planned runs and stages; when given, the predicted wall time of the "
                    "comparison is logged and stored in cost.json"
    ),
]
TrainDataset = Annotated[Path, described(description="dataset folder written by 'ctcompare ingest'")]
PlanFile = Annotated[Path, described(description="the run plan (plan.json) whose runs are trained")]
PlannedRunFolder = Annotated[str | None, described(description="train only this run: its folder as written in the plan "
                                               "(e.g. runs/scratch/main); empty: every run of the plan")]
TrainWeights = Annotated[Path | None, described(description="ResNet-50 ImageNet weights file (torchvision format)")]
WeightsFolder = Annotated[Path | None, described(description="folder of torchvision-format weights files named by "
                                                             "model "
                                            "(e.g. resnet18-f37072fd.pth) for the other models' pretrained arms")]
Resume = Annotated[bool, described(description="continue each run from its last finished epoch")]

# ------------------------------------------------------------------------------------------------ predict, synth
PackagePath = Annotated[str, described(description="a model package folder (model.pt, MODEL_CARD.md), its model.pt, or "
                                   "a run folder holding package/")]
PredictionsFolder = Annotated[str, described(description="folder for predictions.csv, patient_predictions.csv, "
                                         "quarantine.csv and predict.json")]
PredictLabels = Annotated[str | None, described(description=f"optional labels file of the new files, {LABELS_FORMAT}; "
                                            "its labels must be the model's classes")]
PredictWindow = Annotated[Annotated[str, described(pattern=WINDOW_PATTERN)] | None, described(
    description="CT window; must equal the model's own (empty: the model's)")]
PredictSize = Annotated[Annotated[int, described(ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE)] | None, described(
    description="ingest size in pixels; must equal the model's own (empty: the model's)")]
BatchSize = Annotated[int, described(ge=1, le=1024, description="images per forward pass")]
Precision = Annotated[Literal["auto", "fp32", "bf16"], described(description="auto: bf16 where this CPU runs it "
                                                             "natively, else fp32; int8 packages run int8 kernels")]
CohortFolder = Annotated[str, described(description="folder to write the cohort into (dicom/, labels.csv, "
                                                    "lesions.csv)")]
Patients = Annotated[int, described(ge=2, le=20_000,  # tasks.demo.patients.MAX_PATIENTS
                                 description="patients in the cohort (at least 2: both labels occur)")]
SlicesPerPatient = Annotated[int, described(ge=1, le=1000, description="CT slices per patient")]
MatrixSizes = Annotated[list[Annotated[int, described(ge=64, le=1024)]] | None, described(
    description="DICOM matrix sizes in pixels (64 to 1024), drawn per patient; empty: the default mix")]


def _number(value: float) -> str:
    """12 -> '12', 0.5 -> '0.5' (whole numbers without a decimal point or an exponent)."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _main_branch(schema: dict[str, Any]) -> dict[str, Any]:
    """The non-null branch of an optional parameter's JSON schema (anyOf [..., null]), else the schema itself."""
    branches = [b for b in schema.get("anyOf", []) if b.get("type") != "null"]
    return {**branches[0], **{k: v for k, v in schema.items() if k != "anyOf"}} if len(branches) == 1 else schema


def allowed(schema: dict[str, Any], plural: bool = False) -> str:
    """What a parameter's JSON schema allows, in words ('a whole number from 1 to 16'); '' when unbounded."""
    schema = _main_branch(schema)
    if schema.get("type") == "array" and isinstance(schema.get("items"), dict):
        inner = allowed(schema["items"], plural=True)
        if inner.startswith("one of"):
            return f"a list, each item {inner}"
        return f"a list of {inner}" if inner else ""
    if "enum" in schema:
        return "one of " + ", ".join(str(v) for v in schema["enum"])
    noun = {"integer": "whole number", "number": "finite number"}.get(schema.get("type", ""), "")
    noun = f"{noun}s" if plural and noun else f"a {noun}" if noun else ""
    low, high = schema.get("minimum"), schema.get("maximum")
    if low is not None and high is not None:
        bounds = f"from {_number(low)} to {_number(high)}"
    else:
        bounds = " and ".join(text for text in (
            f"at least {_number(low)}" if low is not None else "",
            f"above {_number(schema['exclusiveMinimum'])}" if "exclusiveMinimum" in schema else "",
            f"at most {_number(high)}" if high is not None else "",
            f"below {_number(schema['exclusiveMaximum'])}" if "exclusiveMaximum" in schema else "",
        ) if text)
    return f"{noun} {bounds}".strip() if bounds else ""


def help_for(annotation: Any, default: Any = None) -> str:
    """A parameter type's description with its bounds and default, for argparse help (% escaped)."""
    schema = TypeAdapter(annotation).json_schema()
    text = schema.get("description", "")
    limits = allowed(schema)
    extras = [limits] if limits and not limits.startswith("one of") else []
    extras += [f"default {default}"] if default is not None else []
    text = f"{text} ({'; '.join(extras)})" if extras else text
    return text.replace("%", "%%")


class _Quiet(logging.Filter):
    """Drops Prefect's own log line about refused parameters: the command says it in one sentence instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Parameter validation failed")


def check_flow_parameters(
    flow: Flow, parameters: dict[str, Any], options: dict[str, str] | None = None
) -> dict[str, Any]:
    """The parameters validated against the flow's own signature (Flow.validate_parameters: pydantic, no API, no
    server), or ValueError with one sentence naming the first bad one as the user typed it (`options` maps a
    parameter to its command-line spelling; default --name-with-dashes) and what it allows."""
    from prefect.exceptions import ParameterTypeError

    quiet, logger = _Quiet(), logging.getLogger("prefect.flows")
    logger.addFilter(quiet)
    try:
        return flow.validate_parameters(parameters)
    except ParameterTypeError as error:
        # Prefect's message: "Flow run received invalid parameters:\n - LOC: MESSAGE" per error, in signature order
        first = next((line[3:] for line in str(error).splitlines() if line.startswith(" - ")), str(error))
        location, _, message = first.partition(": ")
        name = location.split(".")[0]
        option = (options or {}).get(name, "--" + name.replace("_", "-"))
        limits = allowed(flow.parameters.properties.get(name, {}))
        given = parameters.get(name)
        if limits:
            raise ValueError(f"{option} must be {limits}, got {given!r}.") from None
        if "pattern" in message:  # a regular expression says nothing to a user: the description does
            description = flow.parameters.properties.get(name, {}).get("description", "").rstrip(".")
            raise ValueError(f"{option} {given!r} is not valid; {description}.") from None
        raise ValueError(f"{option}: {message[:1].lower()}{message[1:].rstrip('.')}, got {given!r}.") from None
    finally:
        logger.removeFilter(quiet)


# Command-line options whose flow parameter is not the option's name with underscores for dashes.
OPTION_PARAMETERS = {"--out": "out_dir", "--set": "settings", "--no-calibrate": "calibrate=false"}
_OPTION = re.compile(r"(?<![\w/.-])--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)(?:\s+([A-Za-z_][\w.]*)=(\S+?))?(?=[\s,;:.)'`]|$)")


def _parameter_words(match: re.Match[str]) -> str:
    """One option as the flow parameter a run form shows: --weights -> weights, --set epochs=3 -> settings
    {"epochs": "3"}."""
    option, key, value = f"--{match.group(1)}", match.group(2), match.group(3)
    name = OPTION_PARAMETERS.get(option, match.group(1).replace("-", "_"))
    if key is None:
        return name
    return f'{name} {{"{key}": "{value}"}}' if option == "--set" else f"{name} {key}={value}"


def as_seen(message: str) -> str:
    """A message written in command-line options, re-worded with the flow parameters' names when this flow run came
    from a deployment (the UI's run form, `prefect deployment run --param`): `weights`, `settings` there; the
    terminal's `--weights`, `--set` otherwise."""
    from prefect.runtime import deployment

    try:
        from_deployment = deployment.id is not None
    except Exception:  # noqa: BLE001 - no API to ask: the command line's words
        from_deployment = False
    return _OPTION.sub(_parameter_words, message) if from_deployment else message


def check_weights_loadable(path: str | None, option: str = "--weights") -> None:
    """ValueError (one sentence) unless the ResNet-50 weights file exists and loads as one (the training stage's own
    loader, tasks.training.weights.read_weights_file: hash in the name, torch.load weights_only, keys, shapes, finite
    values); a file that passed that check and is unchanged since is not loaded again
    (tasks.training.weights_record)."""
    if path is None:
        return
    from tasks.training.weights_check import check_weights_file

    try:
        check_weights_file(Path(path))
    except ValueError as error:
        raise ValueError(f"{option}: {str(error).splitlines()[0].rstrip('.')}.") from None
