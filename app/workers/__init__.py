"""Live workers: each one records its queues and a heartbeat, so queues without one show."""
