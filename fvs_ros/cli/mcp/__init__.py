"""fvs_mcp, an MCP server beside a running fvs node: its memory as tools for LLM agents.

server.py holds the tools and the transports (stdio, streamable HTTP), node_client.py the ROS 2
client of the node. Here in cli/ because it is a command of the same kind as fvs_ask and
fvs_watch: a client of the node's interfaces, never of the engine.
"""
