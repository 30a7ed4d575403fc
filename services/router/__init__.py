"""The router: Folio's front door (gRPC, later HTTP), Redis-backed engine registry, routing."""
