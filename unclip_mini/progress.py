"""Progress bars: `tqdm.auto` by default, plain text where outputs are stored.

In JupyterLab a widget bar is nicest, but a notebook executed by papermill stores a widget's first
frame ("0%"), which is what a reader would see on the web. So the course runner and the tests set
`UNCLIP_PROGRESS=text`: bars are then printed as text to stdout, and the stored output ends with the
bar's final state (steps, time, rate, loss). `UNCLIP_PROGRESS=off` silences them.
"""
import os
import sys

from tqdm import tqdm as _text_tqdm
from tqdm.auto import tqdm as _auto_tqdm


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
        return _text_tqdm(*args, **kwargs)
    return _auto_tqdm(*args, **kwargs)
