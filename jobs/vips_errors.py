"""Turn a pyvips.Error into a message fit for a partner.

libvips keeps one error buffer per process, and even successful loads leave lines in it (heifload's
"bad seek"), so an error's detail may hold other files' lines; and lines name our storage paths, which
carry account ids. Only the meaningful lines are kept, with every absolute path replaced.
"""

from __future__ import annotations

import re

import pyvips

_PATH = re.compile(r"""["']?/[^\s"':]+["']?""")
_NOISE = ("bad seek to", "unable to load from file", "unable to call", "load error")


def describe_vips_error(exc: pyvips.Error, fallback: str = "the image could not be decoded") -> str:
    for line in str(exc.detail or exc.message).splitlines():
        line = _PATH.sub("the file", line.strip())
        if line and not any(noise in line for noise in _NOISE):
            return line.removeprefix("the file: ")
    return fallback
