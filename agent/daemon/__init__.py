"""The long-running side: lifecycle, one module per loop, the job flow, cancels, journal."""
