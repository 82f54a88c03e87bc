"""Moving one call's bytes between ranks: the call's life (header, rows, abort), the typed
header and its verdict, domains and the transport, wire packing, group names, per-process state."""
