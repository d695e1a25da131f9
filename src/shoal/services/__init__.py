"""Services: what routes call. They never see FastAPI objects."""
