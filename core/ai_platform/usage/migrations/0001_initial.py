from tortoise import fields, migrations
from tortoise.migrations import operations as ops


class Migration(migrations.Migration):
    initial = True

    operations = [
        ops.CreateModel(
            name="AuditRecord",
            fields=[
                ("id", fields.BigIntField(generated=True, primary_key=True, unique=True, db_index=True)),
                ("timestamp", fields.DatetimeField(db_index=True, auto_now=False, auto_now_add=False)),
                ("request_id", fields.CharField(null=True, max_length=128)),
                ("method", fields.CharField(max_length=8)),
                ("path", fields.CharField(max_length=256)),
                ("operation", fields.CharField(null=True, max_length=64)),
                ("key_id", fields.CharField(null=True, max_length=16)),
                ("status", fields.SmallIntField()),
                ("duration_ms", fields.FloatField()),
                ("output_tokens", fields.IntField(default=0)),
            ],
            options={
                "table": "audit_record",
                "app": "models",
                "pk_attr": "id",
                "table_description": "One row per API request: who (key id, never the key), what, outcome, cost.",
            },
            bases=["Model"],
        ),
        ops.CreateModel(
            name="DailyUsage",
            fields=[
                ("id", fields.IntField(generated=True, primary_key=True, unique=True, db_index=True)),
                ("operation", fields.CharField(max_length=64)),
                ("day", fields.DateField()),
                ("request_count", fields.IntField(default=0)),
                ("total_tokens", fields.BigIntField(default=0)),
            ],
            options={
                "table": "daily_usage",
                "app": "models",
                "unique_together": (("operation", "day"),),
                "pk_attr": "id",
                "table_description": "Requests and tokens per operation per (UTC) day.",
            },
            bases=["Model"],
        ),
        ops.CreateModel(
            name="OperationLimit",
            fields=[
                ("operation", fields.CharField(primary_key=True, unique=True, db_index=True, max_length=64)),
                ("daily_limit", fields.IntField()),
                ("updated_at", fields.DatetimeField(auto_now=True, auto_now_add=False)),
            ],
            options={
                "table": "operation_limit",
                "app": "models",
                "pk_attr": "operation",
                "table_description": "An admin's override of an operation's daily limit (``PUT /limits``).",
            },
            bases=["Model"],
        ),
    ]
