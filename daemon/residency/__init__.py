"""Model residency: which generators are in memory (``manager``), one generator's slot
(``slot``), the circuit breaker, memory readings, hub download progress, and running a
generator in a child process (``child``)."""
