"""An in-memory Google Cloud Storage server for tests (gcp-storage-emulator), reached by the
same gs:// code paths a real bucket is: gcsfs (etils.epath) through STORAGE_EMULATOR_HOST,
tensorstore (Orbax) through TENSORSTORE_GCS_HTTP_URL.

One difference from real GCS is mended here: the emulator's object reads lack the
`x-goog-generation` header, which tensorstore reads to update an object conditionally (OCDBT
manifests are rewritten that way); without it a checkpoint's second write fails with
"Malformed StorageGeneration". Every upload is also counted per object name, so a test can
tell how often (and whether) a file was written.
"""

from __future__ import annotations

import collections
import contextlib
import json
import socket

from gcp_storage_emulator import server as emulator
from gcp_storage_emulator.handlers import objects

BUCKET = "moe-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _with_generation(download):
    def handler(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        with contextlib.suppress(Exception):  # absent objects: the 404 stands
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])

    return handler


def _counting(handler, uploads):
    """The upload handler, counting each object it finished writing (its resource's name)."""

    def counted(request, response, storage, *args, **kwargs):
        handler(request, response, storage, *args, **kwargs)
        with contextlib.suppress(Exception):  # not a finished object (a resumable upload's middle)
            uploads[json.loads(response._content)["name"]] += 1

    return counted


@contextlib.contextmanager
def running():
    """Yields (env, uploads): the environment variables that point gcsfs and tensorstore at a
    fresh in-memory server with the bucket gs://moe-test, and a Counter of uploads by name."""
    uploads = collections.Counter()
    saved = [(routes, dict(routes)) for _, routes in emulator.HANDLERS]
    for _, routes in emulator.HANDLERS:
        for method, handler in list(routes.items()):
            if handler in (objects.download, objects.get):  # media reads (get: with alt=media)
                routes[method] = _with_generation(handler)
            elif handler in (objects.insert, objects.upload_partial, objects.xml_upload):
                routes[method] = _counting(handler, uploads)
    port = _free_port()
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
        "EPATH_USE_TF": "0",
    }
    try:
        yield env, uploads
    finally:
        server.stop()
        for routes, original in saved:
            routes.clear()
            routes.update(original)
