"""A real Starlette (ASGI) origin under uvicorn for tests/it/bypass.rs.

Its handlers say which one ran. The paid handler must never run for a request that
tollgate did not charge. Usage: python origin_starlette.py PORT
"""
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def handler(name):
    async def ran(request):
        # The header too: a HEAD answer has no body.
        body = {"handler": name, "method": request.method, "path": request.url.path}
        return JSONResponse(body, headers={"X-Handler": name})

    return ran


app = Starlette(
    routes=[
        Route("/paid/{rest:path}", handler("paid"), methods=METHODS),
        Route("/paid-post", handler("paid"), methods=["POST"]),
        Route("/{rest:path}", handler("free"), methods=METHODS),
    ]
)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
