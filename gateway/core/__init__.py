"""The tag core: addresses, prvs, srs, the keyring, the errors, every SMTP reply named once, and the log
line's shape. Pure: it imports no other room."""
