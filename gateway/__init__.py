"""fnbox gateway: the Flask app that turns HTTP requests into sandboxed calls. No process code lives here."""
