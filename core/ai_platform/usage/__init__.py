"""The usage database: its lifecycle (``database.py``: one ``Database`` per app), Tortoise models and migrations,
the per-request transaction runners (``statements.py``) and the audit trail (``audit.py``).

Limits and quotas, which count in this database, are ``ai_platform.limits``; their tables' models stay
in ``models.py`` (Tortoise loads one models module, and the migrations are written against it).
"""
