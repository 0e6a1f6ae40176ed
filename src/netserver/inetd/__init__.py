"""``netserver run``: many services from one TOML config, inetd style, and inetd.conf import."""
