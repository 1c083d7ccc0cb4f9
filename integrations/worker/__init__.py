"""The queue worker example: RabbitMQ in, PostgreSQL out, stopped by SIGTERM without losing a message."""
