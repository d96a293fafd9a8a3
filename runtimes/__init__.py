"""What runs inside a job's own process: the runtime contract and the workloads."""
