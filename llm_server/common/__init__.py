"""What more than one process imports: config types, the messages and the pipe channel between
processes, log plumbing, and how a spawned child begins. Nothing heavy (no Sanic, MCP or MLX)."""
