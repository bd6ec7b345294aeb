"""The memory planner: named terms per device and per node, the layout search, calibration."""
