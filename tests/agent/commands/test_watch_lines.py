"""`watch` shows a job's log lines as they come: a line too long is shown in pieces of
at most MAX_LINE_CHARS, the same pieces however the coordinator cut the log into chunks.
"""

from __future__ import annotations

import pytest

from agent.commands.follow import MAX_LINE_CHARS, Watch

N = MAX_LINE_CHARS


def _shown(chunks: list[str], capsys: pytest.CaptureFixture[str]) -> list[str]:
    events = [({"type": "log", "stream": "stdout", "data": c}, False) for c in chunks]
    Watch("job-1", 10).run(iter(events))
    return capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("size", [3 * N, 3 * N + 5])
def test_a_long_line_is_shown_in_the_same_pieces_however_it_is_chunked(
        size: int, capsys: pytest.CaptureFixture[str]) -> None:
    text = "x" * size + "\n" + "y" * (2 * N) + "\nend\n\n" + "z" * (N + 1)
    whole = _shown([text], capsys)
    assert "".join(whole) == text.replace("\n", "")
    assert max(len(line) for line in whole) <= N and whole[-1] == "z"
    assert whole.count("") == 1  # the one empty line the job printed, no more
    # The same text in chunks that end anywhere: a piece, a char past it, mid-line
    for step in (1000, N, N + 1, 3 * N - 1, 7 * N):
        chunks = [text[i:i + step] for i in range(0, len(text), step)]
        assert _shown(chunks, capsys) == whole, step
