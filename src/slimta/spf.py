"""The import path of the former ``python-slimta-spf`` package.

.. deprecated:: 4.0
   Use :mod:`slimta.util.spf`; this module re-exports it.
"""

from __future__ import annotations

from slimta.util.spf import EnforceSpf

__all__ = ["EnforceSpf"]
