"""The app's routes, one `APIRouter` per concern; each reads its dependencies from `app.state.saelab`
(`saelab.server.deps`), so it can be mounted alone on a bare FastAPI app with a state of its own."""
