"""llm-server's supervisor package: the entry point, config, log file and process lifecycle.

(Unrelated to the ``supervisor`` package of supervisord, which uses the same import name: don't
install both into one environment.)
"""
