"""tcpd: hosts.allow/hosts.deny (hosts_access(5)): parse, match, options, check, and the gate."""
