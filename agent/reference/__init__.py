"""The reference coordinator (server, store, miner and client APIs) and the embedded default.

It speaks the core protocol as the real coordinator behaves, quirks included, plus every
extension in docs/protocol-extensions.md; tests, benchmarks and `miner-agent run` with
no coordinator configured use it. It imports only the core, never the daemon.
"""
