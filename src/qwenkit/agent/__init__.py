"""Tool use: the official ReAct prompt and parser, a tool registry, and built-in tools."""
