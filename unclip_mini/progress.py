"""Progress bars: `tqdm.auto` by default, plain text where outputs are stored.

In JupyterLab a widget bar is nicest, but a notebook executed by papermill stores a widget's first
frame ("0%"), which is what a reader would see on the web. So the course runner and the tests set
`UNCLIP_PROGRESS=text`: bars are then printed as text to stdout, and the stored output ends with the
bar's final state (steps, time, rate, loss). `UNCLIP_PROGRESS=off` silences them.

A text bar on a terminal redraws itself in place (every 5 s at most). Anywhere else (a notebook kernel, a
log file) every redraw is kept, one stored output per redraw, so there a bar prints only at every tenth
of its total (and at least 5 s apart), and a new postfix (the loss) waits for the next print instead of
forcing one: a bar of any length stores about a dozen lines, the last of them its final state.
"""
import math
import os
import sys

from tqdm import tqdm as _text_tqdm
from tqdm.auto import tqdm as _auto_tqdm

STORED_PRINTS = 10     # prints of a bar whose output is stored (besides its first and final states)


class _StoredTqdm(_text_tqdm):
    """A text bar for stored output: `set_postfix` does not print by itself (the next update shows it)."""

    def set_postfix(self, ordered_dict=None, refresh=False, **kwargs):
        super().set_postfix(ordered_dict, refresh=refresh, **kwargs)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def tqdm(*args, **kwargs):
    """Drop-in `tqdm` that follows `UNCLIP_PROGRESS` ('auto' | 'text' | 'off')."""
    mode = os.environ.get("UNCLIP_PROGRESS", "auto")
    if mode == "off":
        kwargs["disable"] = True
    if mode == "text":
        kwargs.setdefault("file", sys.stdout)
        kwargs.setdefault("mininterval", 5.0)
        kwargs.setdefault("ncols", 100)
        kwargs.setdefault("ascii", True)
        if _isatty(kwargs["file"]):
            return _text_tqdm(*args, **kwargs)
        total = kwargs.get("total")
        if total is None and args and hasattr(args[0], "__len__"):
            total = len(args[0])
        if total:
            kwargs.setdefault("miniters", max(1, math.ceil(total / STORED_PRINTS)))
        else:
            kwargs["mininterval"] = max(kwargs["mininterval"], 60.0)
        kwargs.setdefault("maxinterval", float("inf"))   # tqdm's monitor thread must not force extra prints
        return _StoredTqdm(*args, **kwargs)
    return _auto_tqdm(*args, **kwargs)
