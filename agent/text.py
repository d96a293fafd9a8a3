"""Text a stranger chose (a job's output, stage, error, file names; a coordinator's
answer), made safe to show a person: on a terminal, or in a log read on one.

An escape sequence in such text would be acted on by the terminal that shows it
(retitle the window, rewrite lines already shown, set the clipboard), and a newline
in a log message would start a line that looks like the agent's own.
"""

from __future__ import annotations

import re

# C0 controls but tab and newline, DEL, C1 controls (0x9b is a one-byte CSI)
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_CONTROLS_AND_NEWLINE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def printable(text: str, *, one_line: bool = False, overwrite: bool = False) -> str:
    """``text`` safe to print on a terminal: each control character shown as ``\\xNN``,
    never acted on (tab kept; newline too unless ``one_line``). ``overwrite``: only what
    follows the last carriage return, as a terminal shows a redrawn line (tqdm's)."""
    if overwrite:
        text = text.rsplit("\r", 1)[-1]
    pattern = _CONTROLS_AND_NEWLINE if one_line else _CONTROLS
    return pattern.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
