"""Operations: config, the keyring file, state stores, metrics, reloads, sd_notify, workers, serve."""
