"""`python -m fvs_ros.cli.mcp`: the fvs_mcp server."""

from fvs_ros.cli.mcp.server import main

main()
