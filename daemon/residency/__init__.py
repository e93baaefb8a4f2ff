"""Model residency helpers: the circuit breaker, memory readings, hub download
progress, and running a generator in a child process (``child.ChildGenerator``).

The policy itself (which models stay loaded, eviction, keep_alive) lives in
``daemon.models``.
"""
