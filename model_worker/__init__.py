"""llm-server's model worker: MLX engine, MCP host and the tool-calling loop."""
