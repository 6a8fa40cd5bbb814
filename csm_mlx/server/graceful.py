"""uvicorn with the stop a service manager expects: the first SIGTERM or SIGINT stops accepting and
lets running responses finish for up to a timeout, then cuts the rest as a dropped server would
(their clients see a chunked body with no end); a second signal cuts them at once. The process
then exits normally, with no traceback."""

import asyncio
import logging
import socket
from typing import List, Optional

import uvicorn

log = logging.getLogger("csm_mlx.server")

CUT_GRACE = 2.0  # seconds for the cut responses' tasks to see their connections closed


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, shutdown_timeout: float):
        super().__init__(config)
        self.shutdown_timeout = shutdown_timeout

    def handle_exit(self, sig, frame) -> None:
        # uvicorn forces only on a second SIGINT, and raises the signal again once stopped (for
        # SIGTERM: an exit by signal, not 0); here any second signal forces and none is raised again.
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True

    async def shutdown(self, sockets: Optional[List[socket.socket]] = None) -> None:
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        connections = self.server_state.connections
        for connection in list(connections):
            connection.shutdown()  # idle ones close now, busy ones after their response
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.shutdown_timeout
        if connections and not self.force_exit:
            log.warning("stopping: %d response(s) may finish within %g s (signal again to stop now)",
                        len(connections), self.shutdown_timeout)
        while connections and not self.force_exit and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if connections:
            log.warning("stopping: cutting %d response(s) short", len(connections))
        for connection in list(connections):
            connection.transport.close()  # the routes see a client that went away and stop
        deadline = loop.time() + CUT_GRACE
        while self.server_state.tasks and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await self.lifespan.shutdown()  # even when forced: a lifespan task left running ends in a traceback


def serve(app, sock: socket.socket, shutdown_timeout: float, log_level: str = "warning",
          access_log: bool = False) -> None:
    """Serve app on the listening socket until a signal stops it (returns then)."""
    config = uvicorn.Config(app, log_level=log_level, access_log=access_log)
    GracefulServer(config, shutdown_timeout).run(sockets=[sock])
