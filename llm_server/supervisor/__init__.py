"""The supervisor process: the entry point, the log file, the listening socket and the lifecycle
of the two children (spawned by module path, so nothing heavy is imported here)."""
