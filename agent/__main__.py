"""`python -m agent` runs the `miner-agent` command."""

from agent.cli import main

main()
