"""The model worker process: MLX engine, MCP host and the tool-calling loop."""
