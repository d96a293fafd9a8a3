"""miner-agent: the daemon side of the GPU miner execution agent.

Nothing in this package imports torch: torch lives only in job processes and in
the fork server (``agent.forkserver``), which are separate processes.
"""

__version__ = "0.1.0"
