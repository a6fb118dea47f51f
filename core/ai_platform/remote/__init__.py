"""Remote OpenAI-compatible engines as operation backends (README, "Configuration").

``target`` parses an ``OPERATION_MODEL_MAP`` value such as ``openai+http://gpu-01:8000/v1#Qwen2.5-7B-Instruct``
(standard library only: the settings use it); ``engine`` is :class:`~ai_platform.remote.engine.RemoteEngine`,
the engine contract over ``/v1/chat/completions`` (httpx); ``circuit`` its circuit breaker; ``sse`` the
Server-Sent Events reader. Nothing here knows HTTP routes, limits, usage or the local runtime.
"""
