"""The HTTP front: FastAPI app, routers, dependencies."""
