"""The test that scans the pipeline's sources for unpickling must not depend on the locale.

GDCM's DICOM writer switches the process to the C locale, in which Python reads text files
as ASCII by default; the sources are UTF-8 (PEP 3120: ``models/unet3d.py`` cites Çiçek et
al.), so the scan has to say which encoding it reads.
"""

from __future__ import annotations

import contextlib
import locale

from tests import test_bad_input


@contextlib.contextmanager
def c_locale():
    """The process in the C locale, as GDCM leaves it; the locale is put back after."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        locale.setlocale(locale.LC_ALL, "C")
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def test_source_scan_reads_utf8_in_the_c_locale():
    assert any(not path.read_bytes().isascii() for path in test_bad_input.SOURCES)
    with c_locale():
        test_bad_input.test_no_untrusted_file_is_ever_unpickled()
