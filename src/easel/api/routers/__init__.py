"""One router per resource: jobs, images, models, and system (health, queue)."""
