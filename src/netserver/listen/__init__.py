"""Listening: binding addresses, inherited sockets, accept, PROXY protocol, TLS termination."""
