"""One job's process, parent side: launch, capture, cancel, outcome, package, verify (core only)."""
