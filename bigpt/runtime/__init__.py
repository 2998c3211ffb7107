"""Process groups, the CPU compatibility layer and seeding."""
