"""Cost: FLOPs, memory, device catalogue, calibration and the wall-time estimate of a comparison."""

from tasks.cost.calibration import load_or_calibrate
from tasks.cost.catalogue import default_catalogue_path, load_catalogue
from tasks.cost.estimate import (
    build_cost_report,
    calibrate_task,
    estimate_task,
    estimated_seconds_for,
    resolve_cost_inputs,
    write_task,
)
from tasks.cost.first_epoch import first_epoch_watch
from tasks.cost.flops import count_phase
from tasks.cost.memory import measure_activation_memory
from tasks.cost.wall_time import predict_wall_time, wall_time_plan

__all__ = [
    "build_cost_report", "calibrate_task", "count_phase", "default_catalogue_path", "estimate_task",
    "estimated_seconds_for", "first_epoch_watch", "load_catalogue", "load_or_calibrate", "measure_activation_memory",
    "predict_wall_time", "resolve_cost_inputs", "wall_time_plan", "write_task",
]
