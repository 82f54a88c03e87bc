"""Seeing what the communication did: typed trace records and their matcher, the trace sink
and Perfetto merge, the flight recorder and dead-peer diagnosis, the report's tables and pictures."""
