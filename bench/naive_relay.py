"""The naive reference relay: the baseline that batv-gateway is measured against (issue 5).

aiosmtpd with its defaults, and a DATA handler that opens a new aiosmtplib connection per message and
returns the next hop's reply. Kept deliberately small and untuned so the baseline never drifts: do not
optimise this file.

    python3 bench/naive_relay.py --listen 127.0.0.1:10025 --next-hop 127.0.0.1:10026
"""

from __future__ import annotations

import argparse
import asyncio

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session


class NaiveRelay:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        sender = "" if envelope.mail_from == "<>" else envelope.mail_from
        try:
            async with aiosmtplib.SMTP(hostname=self.host, port=self.port) as client:
                await client.mail(sender)
                for rcpt in envelope.rcpt_tos:
                    await client.rcpt(rcpt)
                reply = await client.data(envelope.original_content)
        except aiosmtplib.SMTPResponseException as exc:
            return f"{exc.code} {exc.message}"
        except (OSError, aiosmtplib.SMTPException):
            return "451 4.4.1 next hop unavailable"
        return f"{reply.code} {reply.message}"


async def serve(listen: str, next_hop: str) -> None:
    host, port = listen.rsplit(":", 1)
    hop_host, hop_port = next_hop.rsplit(":", 1)
    handler = NaiveRelay(hop_host, int(hop_port))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(handler), host, int(port))
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT to accept SMTP on")
    parser.add_argument("--next-hop", required=True, help="HOST:PORT to relay each message to")
    args = parser.parse_args()
    asyncio.run(serve(args.listen, args.next_hop))
