"""SIGHUP: read the config again and apply what can change without a restart.

The config is read from the same sources as at start (the file, the environment, the
flags: a :class:`ConfigSource`). What may change while jobs run is
:data:`RELOADABLE` (the fields of it this config has); a change to any other field is
logged as waiting for a restart. A config that does not load, or an API key file that
cannot be read, is refused as a whole: the running config stays. When a field the
coordinator matches on changed (:data:`CAPABILITY_FIELDS`), the agent registers again.

The key file is also read again, once, when the coordinator answers 401 (the transport
asks :func:`key_now`), so a rotated key needs neither a restart nor a SIGHUP.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from agent.config import AgentConfig
from agent.coordinator.client import CoordinatorClient
from agent.errors import ConfigError, CoordinatorError

log = logging.getLogger(__name__)
# Add a field here once whatever reads it reads it from the agent's current config.
RELOADABLE = ("allowed_job_types", "price", "api_key", "tags", "hooks_dir", "hook_timeout_s")
CAPABILITY_FIELDS = frozenset({"allowed_job_types", "price", "tags"})
_FIELDS = frozenset(f.name for f in dataclasses.fields(AgentConfig))


@dataclass(frozen=True)
class ConfigSource:
    """Where the running agent's config came from, to read it again."""

    load: Callable[[], AgentConfig]  # file, environment, flags: as at start
    loaded: AgentConfig  # what it gave at start (restart-only changes compare with this)
    key_from_config: bool = True  # False: the embedded coordinator's own key


def reloadable() -> tuple[str, ...]:
    """The fields a reload applies (those of :data:`RELOADABLE` this config has)."""
    return tuple(name for name in RELOADABLE if name in _FIELDS)


def key_now(cfg: AgentConfig, source: ConfigSource | None) -> str | None:
    """The API key as the config names it now; None where the key is not the config's.

    Raises ConfigError when the key file is there but cannot be read.
    """
    if source is None or not source.key_from_config:
        return None
    return cfg.resolved_api_key() or None


def _changed(old: AgentConfig, new: AgentConfig, names: Any) -> dict[str, tuple[Any, Any]]:
    return {n: (getattr(old, n), getattr(new, n)) for n in names
            if getattr(old, n) != getattr(new, n)}


class Reloader:
    """Runs a reload when SIGHUP asks for one; the handler only sets a flag."""

    def __init__(self, source: ConfigSource | None, *, current: Callable[[], AgentConfig],
                 apply: Callable[[AgentConfig], None], client: CoordinatorClient,
                 register: Callable[[], Awaitable[None]]) -> None:
        self.source = source
        self.current = current
        self.apply = apply  # hands the new config to everything that reads a reloadable field
        self.client = client
        self.register = register
        self._wanted = asyncio.Event()

    def request(self, _signum: int | None = None) -> None:
        """SIGHUP's handler: reload soon, on the loop."""
        self._wanted.set()

    async def run(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            await self.reload()

    async def reload(self) -> bool:
        """Read the config again and apply what may change; False when it was refused."""
        if self.source is None:
            log.warning("SIGHUP: this agent was started without a config source to read "
                        "again; nothing reloaded")
            return False
        old = self.current()
        try:
            new = await asyncio.to_thread(self.source.load)
            # The key file's path is not reloaded (the job sandbox covers the one named at
            # start); its content is.
            key = key_now(dataclasses.replace(new, api_key_file=old.api_key_file), self.source)
        except ConfigError as exc:
            log.error("config reload refused, the running config stays: %s", exc.message)
            return False
        for name in _changed(self.source.loaded, new, _FIELDS - set(reloadable())):
            log.warning("config reload: %s changed; that takes a restart", name)
        changed = _changed(old, new, reloadable())
        self.apply(dataclasses.replace(old, **{n: v for n, (_, v) in changed.items()}))
        for name, (was, now) in changed.items():
            if name == "api_key":
                continue  # a secret: never logged
            log.info("config reload: %s %r -> %r", name, was, now)
        if key is not None and self.client.set_api_key(key):
            log.info("config reload: the API key changed; using the new one")
        if CAPABILITY_FIELDS & set(changed):
            await self._register_again()
        elif not changed:
            log.info("config reload: nothing to change")
        return True

    async def _register_again(self) -> None:
        try:
            await self.register()
        except CoordinatorError as exc:
            log.warning("config reload: capabilities not registered again (%s); the "
                        "coordinator keeps the old ones until the next registration", exc)
