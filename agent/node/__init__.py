"""The node: telemetry (NVML, host), metrics, sd_notify, logging, doctor, bench (core only)."""
