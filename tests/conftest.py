import pytest


@pytest.fixture(autouse=True, scope="session")
def _session_cache(tmp_path_factory):
    """Decoded-image cache shared by one test session, never the user's ~/.cache/facegen."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FACEGEN_CACHE", str(tmp_path_factory.mktemp("facegen-cache")))
    yield
    mp.undo()
