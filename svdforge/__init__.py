"""svdforge: compress Hugging Face causal LMs by truncation-aware SVD (SVD-LLM), as a library and a service.

One import root. The folders of the repository are its subpackages (pyproject.toml maps them):

    svdforge.core         the library: the math, the layer loop, the pipeline (imports nothing of the service)
    svdforge.persistence  settings, database tables, job state, artifact storage, and the queue
                          (`persistence.queue`: the Celery app factory and `enqueue`, shared by
                          the API and the worker)
    svdforge.api          the FastAPI app
    svdforge.worker       the Celery task and the job runner
    svdforge.cli          the `svdforge` command and `svdforge serve` (API + worker on one machine)
    svdforge.migrations   Alembic

docs/architecture.md is the map.
"""
__version__ = "0.1.0"
