"""Orchestration (``orchestration.py``): how a request runs, between the HTTP routes and the engine and limits."""
