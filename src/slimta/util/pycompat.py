"""Names that let 4.0 scripts written for Python 2 and 3 import unchanged.

This package runs on Python 3 only: :data:`PY2` is false, :data:`PY3` true,
and the module names are the Python 3 ones. New code should import
:mod:`urllib.parse`, :mod:`http.client` and :mod:`reprlib` directly.
"""

from __future__ import annotations

import http.client as httplib
import reprlib
import urllib.parse as urlparse

__all__ = ["PY2", "PY3", "httplib", "reprlib", "urlparse"]

#: Always ``False``.
PY2 = False
#: Always ``True``.
PY3 = True
