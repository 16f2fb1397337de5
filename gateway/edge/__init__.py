"""The SMTP edge: the server's state machine and its asyncio protocol, the in-session relay, the next-hop
client."""
