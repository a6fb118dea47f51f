"""API layer: routes, authentication, error mapping and the schemas of system endpoints."""
