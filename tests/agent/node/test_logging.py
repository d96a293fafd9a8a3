"""The agent's log formats: a message is one line whatever it quotes; tracebacks keep theirs.

Real handlers of the logging module writing to a buffer, the formatters the daemon uses.
"""

from __future__ import annotations

import io
import json
import logging

import pytest

from agent.node.logging_setup import JournalFormatter, JsonFormatter, TextFormatter

FORGED = "<6>agent.daemon.outbox: job FORGED: reported (result)"


def logged(formatter: logging.Formatter, message: str, *args: object,
           traceback: bool = False) -> str:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    logger = logging.getLogger(f"test.logging.{id(out)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        if traceback:
            try:
                raise ValueError("boom")
            except ValueError:
                logger.exception(message, *args)
        else:
            logger.info(message, *args)
    finally:
        logger.removeHandler(handler)
    return out.getvalue()


@pytest.mark.parametrize("formatter", [JournalFormatter(), TextFormatter()],
                         ids=["journal", "text"])
def test_a_quoted_newline_or_escape_stays_inside_its_message(
        formatter: logging.Formatter) -> None:
    # Given a message quoting a stranger's words: a newline, a forged line, an escape
    text = logged(formatter, "job %s: failed (%s)", "j1", f"x\n{FORGED}\x1b[2J")
    # Then it is one line, the words shown, nothing of theirs starting a line
    assert text.count("\n") == 1 and "\x1b" not in text
    assert f"job j1: failed (x\\x0a{FORGED}\\x1b[2J)" in text
    assert text.startswith("<6>test.logging.") or " INFO test.logging." in text


@pytest.mark.parametrize("formatter", [JournalFormatter(), TextFormatter()],
                         ids=["journal", "text"])
def test_a_traceback_keeps_its_lines(formatter: logging.Formatter) -> None:
    text = logged(formatter, "it failed", traceback=True)
    lines = text.splitlines()
    assert len(lines) >= 4 and "ValueError: boom" in lines[-1]
    if isinstance(formatter, JournalFormatter):  # each line carries its priority
        assert all(line.startswith("<3>") for line in lines)


def test_json_lines_carry_the_words_as_they_were() -> None:
    text = logged(JsonFormatter(), "failed (%s)", f"x\n{FORGED}")
    assert text.count("\n") == 1
    assert json.loads(text)["msg"] == f"failed (x\n{FORGED})"
