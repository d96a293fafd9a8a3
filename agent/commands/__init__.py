"""The `miner-agent` verbs, one module per command group; everything below is theirs to use."""
