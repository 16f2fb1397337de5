"""`batv-gateway demo`: a newcomer's tour, on loopback, in a few seconds (see demo.py for the story).

Exit codes: 0 when every scene went as told, 1 when one did not (the output says which), 2 when the
gateway could not start.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        prog="batv-gateway demo",
        help="show the whole story on loopback: signed, bounced back, backscatter refused",
        usage="batv-gateway demo",
        description="Start the gateway on loopback with a throwaway keyring and two in-process sinks, "
        "send a message out (its return path is signed), bounce it back (accepted, tag stripped) and "
        "send a forged bounce (refused with 550 at RCPT). Then print the commands to run it for real.",
    )
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    # Imported here: the other sub-commands do not need the SMTP stack loaded.
    from ..ops import demo

    return demo.main(sys.stdout)
