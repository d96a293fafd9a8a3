"""The node itself: telemetry (NVML, host), metrics, sd_notify, logging, doctor, bench (core only)."""
