"""The API's one error shape, {"error": code, "message": text}, for every file that answers."""

import json

import bottle


class ApiError(bottle.HTTPResponse):
    """An answer with the one error shape; raise it anywhere in a request."""

    def __init__(self, status: int, code: str, message: str, headers=None):
        super().__init__(body=error_body(code, message), status=status, headers=headers)
        self.content_type = "application/json"


def error_body(code: str, message: str) -> str:
    return json.dumps({"error": code, "message": message})
