"""Admission: the Gate contract for the accept path, allow/deny rules and connection limits."""
