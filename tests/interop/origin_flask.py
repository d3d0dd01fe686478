"""A real Flask (WSGI, Werkzeug) origin for tests/it/bypass.rs.

Its handlers say which one ran. The paid handler must never run for a request that
tollgate did not charge. Usage: python origin_flask.py PORT
"""
import sys

from flask import Flask, request

app = Flask(__name__)
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def ran(handler):
    # The header too: a HEAD answer has no body.
    body = {"handler": handler, "method": request.method, "path": request.path}
    return body, {"X-Handler": handler}


@app.route("/paid/<path:rest>", methods=METHODS)
def paid(rest):
    return ran("paid")


@app.route("/paid-post", methods=["POST"])
def paid_post():
    return ran("paid")


@app.route("/", defaults={"rest": ""}, methods=METHODS)
@app.route("/<path:rest>", methods=METHODS)
def free(rest):
    return ran("free")


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(sys.argv[1]), threaded=True)
