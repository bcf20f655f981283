"""Policy: the Structs platform teams write (model), their loader (load) and the routing engine (engine)."""
