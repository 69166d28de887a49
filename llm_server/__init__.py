"""llm-server: one local MLX model over HTTP, with tools from MCP servers.

The packages are the processes: ``supervisor`` (the entry point, the log file, the listening
socket and the children's lifecycle; it imports neither Sanic, MCP nor MLX), ``http`` (the Sanic
process) and ``worker`` (the model worker: MLX, the MCP host and the tool loop). What more than
one process uses (the config types, the messages and the pipe channel, the log plumbing, a
child's start) lives in ``common``.
"""
