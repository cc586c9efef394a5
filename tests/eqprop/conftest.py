"""Fixtures shared by the trainer tests: a small text file, and training without the plot."""

import pytest

TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\n\n" * 40


@pytest.fixture
def data(tmp_path):
    """A small UTF-8 corpus to train on (its path, as the CLI takes it)."""
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return str(path)


@pytest.fixture
def no_plot(monkeypatch):
    """Training without curves.png (slow, and not what those tests check)."""
    import gradstats.eqprop.train._loop as loop

    monkeypatch.setattr(loop, "_plot", lambda *args: None)
