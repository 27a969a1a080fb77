"""JSON echo: measures the cost of moving a request body in and a response body out of the call."""


def main(request):
    return request.get_json()
