"""The example service and the ``poolkeeper demo`` command.

``poolkeeper.demo.service`` is a small FastAPI service kept by poolkeeper (SQLAlchemy on SQLite by
default, PostgreSQL, Redis and an HTTP upstream when their URLs are given).
``poolkeeper.demo.traffic`` starts it, routes load to it only while it is ready (as a load
balancer would), sends it SIGTERM and records what happened; ``poolkeeper demo`` prints that.
Shipped in the wheel so that the demo runs from an installed package (``poolkeeper[fastapi,sqlalchemy]``).
"""
