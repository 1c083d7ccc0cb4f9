"""The poolkeeper pytest plugin (placeholder until its issue lands; registered via ``pytest11``)."""
