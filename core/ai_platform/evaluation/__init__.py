"""Answers you can trust: operations run on their own labelled examples.

- :mod:`.examples`: choosing and checking an operation's :class:`~ai_platform.operations.Example` s.
- :mod:`.runner`: one example through an engine the way the server runs a request (the
  plugins' hooks, the engine's check, the model call, the response schema), timed.
- :mod:`.metrics`: the measures (scikit-learn, sacrebleu, rouge-score; ECE written here).
- :mod:`.scoring`: which measures an operation gets, from its model call and expected fields.
- :mod:`.evaluate`, :mod:`.report`: ``ai-platform eval`` (model folders by operations, one table).
- :mod:`.selftest`: ``ai-platform selftest`` and ``GET /health?deep=true`` (one example per
  operation: does it answer, in its schema?).

Only :mod:`.metrics` needs the ``eval`` extra (``pip install 'ai-platform[eval]'``), and only when
it computes a score: the self-tests run on a server's own dependencies.
"""
