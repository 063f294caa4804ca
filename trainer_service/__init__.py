"""The trainer service: runs training jobs from the Redis queue and publishes snapshot versions."""
