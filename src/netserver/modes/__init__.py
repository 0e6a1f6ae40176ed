"""Every way of running handlers, all behind the `Mode` contract in `base`: fork,
prefork, thread, async (with worker processes), exec for commands, and the modes a gate
diverts connections to (tcpd's twist, a command with setenv variables)."""
