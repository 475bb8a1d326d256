"""Cost: FLOPs, memory, device catalogue, calibration and the wall-time estimate of a comparison."""

from tasks.cost.estimate import calibrate_task, estimated_seconds_for, wall_time_plan

__all__ = ["calibrate_task", "estimated_seconds_for", "wall_time_plan"]
