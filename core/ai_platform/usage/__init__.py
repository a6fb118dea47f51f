"""Usage and limits: daily counters, admin-set limits and the audit trail (Tortoise ORM)."""
