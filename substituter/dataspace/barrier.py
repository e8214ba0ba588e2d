"""A round trip through a dataspace that works across any relay.

syndicate-server 0.50 closes the connection on syndicate-py's ``sync`` packet, so a barrier is
built from plain assertions: assert a fresh ``<substituter-barrier nonce>`` and wait to see it
come back.  A dataspace handles a connection's events in order, so by then every earlier
assertion (including observers' initial matches) has been delivered.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from preserves import Record, Symbol
from syndicate import patterns as P
from syndicate import turn
from syndicate.dataspace import during

__all__ = ["barrier"]

_LABEL = Symbol("substituter-barrier")


def barrier(ds: Any, k: Callable[[], None]) -> None:
    """Call ``k`` (in a turn) once the dataspace has handled everything sent before; in a turn."""
    nonce = secrets.token_hex(8)

    def boot() -> None:
        facet = turn.active_facet()
        handle = turn.publish(ds, Record(_LABEL, [nonce]))

        @during(ds, P.rec("substituter-barrier", P.lit(nonce)))
        def came_back() -> None:
            turn.retract(handle)
            turn.stop(facet)
            k()

    turn.facet(boot)
