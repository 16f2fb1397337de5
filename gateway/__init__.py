"""batv-gateway: a return-path signing gateway (BATV prvs and SRS) that stops backscatter."""

__version__ = "0.1.0"
