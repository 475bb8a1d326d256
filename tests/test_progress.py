"""Progress: a bar with rate and time left on a terminal, a few log lines elsewhere."""

from __future__ import annotations

import io

from tasks.progress import progress


class FakeTerminal(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_off_a_terminal_progress_is_about_ten_log_lines() -> None:
    lines: list[str] = []
    with progress(1000, "decoded", "file", lines.append, stream=io.StringIO()) as update:
        for _ in range(100):
            update(10)
    assert 10 <= len(lines) <= 11, lines
    assert lines[-1].startswith("decoded 1000/1000 files (") and "files/s" in lines[-1] and "s left" in lines[-1]


def test_on_a_terminal_progress_is_a_bar_with_rate_and_time_left() -> None:
    terminal, lines = FakeTerminal(), []
    with progress(40, "decoded", "file", lines.append, stream=terminal) as update:
        for _ in range(4):
            update(10)
    assert lines == []  # no log lines under a bar
    final = terminal.getvalue().split("\r")[-1]
    assert "40/40" in final and "file/s" in final and "100%" in final, final
