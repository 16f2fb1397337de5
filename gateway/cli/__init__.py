"""The command line: `batv-gateway` and its sub-commands."""
