"""Application and orchestration layers, between the HTTP routes and the runtime/usage layers."""
