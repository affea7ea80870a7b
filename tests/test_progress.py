"""Progress bars: text bars whose output is stored print a dozen lines, whatever their length, ending on the
final state."""
import io

from unclip_mini import progress


def _frames(text):
    return [f for f in text.replace("\n", "\r").split("\r") if f.strip()]


def test_stored_text_bar_prints_a_dozen_lines_ending_on_the_final_state(monkeypatch):
    monkeypatch.setenv("UNCLIP_PROGRESS", "text")
    out = io.StringIO()                                   # not a terminal: every redraw would be stored
    bar = progress.tqdm(total=5000, desc="stage", file=out, mininterval=0)
    for step in range(10, 5001, 10):                     # the training loop's pattern: postfix, then update
        bar.set_postfix(loss=f"{1 / step:.4f}")
        bar.update(step - bar.n)
    bar.close()
    frames = _frames(out.getvalue())
    assert len(frames) <= progress.STORED_PRINTS + 3, frames
    assert "5000/5000" in frames[-1] and "loss=0.0002" in frames[-1]


def test_text_bar_on_a_terminal_keeps_redrawing(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setenv("UNCLIP_PROGRESS", "text")
    out = Tty()
    bar = progress.tqdm(total=100, desc="stage", file=out, mininterval=0)
    for _ in range(100):
        bar.set_postfix(loss="1")
        bar.update(1)
    bar.close()
    assert len(_frames(out.getvalue())) > 50


def test_off_silences(monkeypatch):
    monkeypatch.setenv("UNCLIP_PROGRESS", "off")
    out = io.StringIO()
    for _ in progress.tqdm(range(10), file=out):
        pass
    assert out.getvalue() == ""
