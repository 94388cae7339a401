"""Every command's handler, by command model: the 1.0 ones in core, the 1.1 ones beside it."""

from __future__ import annotations

from . import changes, core, receipts, search
from . import protocol as p

HANDLERS: dict[type[p.Command], core.Handler] = {
    **core.HANDLERS,
    **receipts.HANDLERS,
    **changes.HANDLERS,
    **search.HANDLERS,
}
