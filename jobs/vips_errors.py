"""Turn a pyvips.Error into a message fit for a partner.

libvips keeps one error buffer per process, and even successful loads leave lines in it (heifload's
"bad seek"), so an error's detail may hold other files' lines; and lines name our storage paths, which
carry account ids. Only the meaningful lines are kept, with every absolute path replaced.
"""

from __future__ import annotations

import errno
import os
import re

import pyvips

_PATH = re.compile(r"""["']?/[^\s"':]+["']?""")
# libvips prefixes messages with the class that raised them ("VipsJpeg: ", "gifload: "): not for partners.
_SOURCE_PREFIX = re.compile(r"^(?:[A-Za-z0-9_]+: )+")
_NOISE = ("bad seek to", "unable to load from file", "unable to call", "load error")


def describe_vips_error(exc: pyvips.Error, fallback: str = "the image could not be decoded") -> str:
    for line in str(exc.detail or exc.message).splitlines():
        line = _PATH.sub("the file", line.strip())
        if line and not any(noise in line for noise in _NOISE):
            return _SOURCE_PREFIX.sub("", line.removeprefix("the file: ")) or fallback
    return fallback


# libvips reports a failed write as text ("system error: No space left on device"), not as an errno.
_FULL_MESSAGES = tuple(os.strerror(number) for number in (errno.ENOSPC, errno.EDQUOT))


def reports_storage_full(exc: pyvips.Error) -> bool:
    """Whether libvips failed for want of room to write: the storage's fault, not the image's."""
    text = f"{exc.message}\n{exc.detail}"
    return any(message in text for message in _FULL_MESSAGES)
